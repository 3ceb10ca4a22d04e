//! The benchmark profiles: one fio job file each (in `fio-configs/`), what is measured and the
//! target against qemu-nbd serving the qcow2 overlay.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Which number of a run a profile is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Metric {
    /// Operations per second (reads + writes).
    Iops,
    /// Bytes per second (reads + writes).
    Bandwidth,
}

/// What a profile does to the overlay, so the runner can give every server the same start state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Effect {
    /// Only reads: the prepared data is unchanged.
    ReadOnly,
    /// Writes into the prepared 50%-written overlay: restore it before the next run.
    Writes,
    /// Needs a freshly created, empty overlay (the allocating path).
    FreshOverlay,
}

/// One benchmark profile.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// Short id (also the job file's stem).
    pub id: &'static str,
    /// Human title.
    pub title: &'static str,
    /// Job file name in `fio-configs/`.
    pub job: &'static str,
    /// What the profile is judged by.
    pub metric: Metric,
    /// Target ratio addcow / qemu-nbd-qcow2 for `metric`, if one is set.
    pub target: Option<f64>,
    /// What the profile does to the data.
    pub effect: Effect,
}

/// Every profile, in run order.
pub fn all() -> Vec<Profile> {
    use Effect::*;
    use Metric::*;
    let p = |id, title, job, metric, target, effect| Profile {
        id,
        title,
        job,
        metric,
        target,
        effect,
    };
    vec![
        p(
            "randread",
            "4 KiB random read QD32",
            "randread-4k-qd32.fio",
            Iops,
            Some(1.3),
            ReadOnly,
        ),
        p(
            "randwrite",
            "4 KiB random write QD32",
            "randwrite-4k-qd32.fio",
            Iops,
            Some(1.3),
            Writes,
        ),
        p(
            "randrw",
            "70/30 random r/w 4 KiB QD32",
            "randrw-70-30-4k-qd32.fio",
            Iops,
            Some(1.3),
            Writes,
        ),
        p(
            "seqread",
            "1 MiB sequential read QD8",
            "seqread-1m-qd8.fio",
            Bandwidth,
            Some(1.3),
            ReadOnly,
        ),
        p(
            "seqwrite",
            "1 MiB sequential write QD8",
            "seqwrite-1m-qd8.fio",
            Bandwidth,
            Some(1.3),
            Writes,
        ),
        p(
            "syncwrite",
            "sync 4 KiB random write, 4 jobs, fsync=1",
            "sync-randwrite-4k-4jobs.fio",
            Iops,
            Some(1.5),
            Writes,
        ),
        p(
            "firstwrite",
            "first writes into a fresh overlay, 4 KiB QD32",
            "first-write-4k-qd32.fio",
            Iops,
            None,
            FreshOverlay,
        ),
        p(
            "multiconn",
            "4 KiB random read, 4 connections x QD16",
            "multiconn-randread-4k-4x16.fio",
            Iops,
            None,
            ReadOnly,
        ),
    ]
}

/// The metric profile `id` is judged by (IOPS for an unknown id).
pub fn metric_of_id(id: &str) -> Metric {
    all()
        .into_iter()
        .find(|p| p.id == id)
        .map_or(Metric::Iops, |p| p.metric)
}

/// `fio-configs/` of this checkout (found from the crate's manifest directory at build time, or
/// the current directory).
pub fn configs_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let from_manifest = manifest.parent().unwrap_or(manifest).join("fio-configs");
    if from_manifest.is_dir() {
        from_manifest
    } else {
        PathBuf::from("fio-configs")
    }
}

/// Keeps the profiles whose id is in `only` (all when `only` is empty); unknown ids are an error.
pub fn select(only: &[String]) -> Result<Vec<Profile>, String> {
    let all = all();
    if only.is_empty() {
        return Ok(all);
    }
    for id in only {
        if !all.iter().any(|p| p.id == id) {
            let ids: Vec<_> = all.iter().map(|p| p.id).collect();
            return Err(format!("unknown profile {id:?}; known: {}", ids.join(", ")));
        }
    }
    Ok(all
        .into_iter()
        .filter(|p| only.iter().any(|o| o == p.id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_file_exists_and_has_both_sections() {
        let dir = configs_dir();
        for p in all() {
            let text = std::fs::read_to_string(dir.join(p.job))
                .unwrap_or_else(|e| panic!("{}: {e}", p.job));
            assert!(
                text.contains("[nbd]") && text.contains("[file]"),
                "{}",
                p.job
            );
            assert!(
                text.contains("uri=nbd+unix:///?socket=${SOCK}"),
                "{}",
                p.job
            );
            assert!(text.contains("filename=${FILE}"), "{}", p.job);
            assert!(
                text.contains("${RUNTIME}") && text.contains("${SIZE}"),
                "{}",
                p.job
            );
        }
    }

    #[test]
    fn select_filters_and_rejects_unknown() {
        assert_eq!(select(&[]).map(|v| v.len()), Ok(8));
        let got = select(&["seqread".to_owned()]).map(|v| v.len());
        assert_eq!(got, Ok(1));
        assert!(select(&["nope".to_owned()]).is_err());
    }
}
