//! What a server spends per request, to say where the time goes: CPU time of the server process
//! (from `/proc/PID/stat`, always, free) and, with `--perf`, system calls and context switches
//! counted by `perf stat -p PID` (the tracepoint costs a little per syscall, so it is opt-in).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// Counters of one server over one fio run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// User + system CPU seconds of the server process (all threads).
    pub cpu_s: Option<f64>,
    /// System calls entered (perf `raw_syscalls:sys_enter`).
    pub syscalls: Option<u64>,
    /// Context switches (perf `context-switches`): wakeups and preemptions.
    pub context_switches: Option<u64>,
}

/// User + system CPU seconds used so far by process `pid` (all its threads, dead ones included).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (utime, stime) = parse_stat_times(&text)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((utime + stime) as f64 / hz)
}

/// `(utime, stime)` in clock ticks from a `/proc/PID/stat` line (fields 14 and 15; the command
/// name in parentheses may hold spaces, so fields are counted after the last `)`).
fn parse_stat_times(text: &str) -> Option<(u64, u64)> {
    let after = text.get(text.rfind(')')? + 1..)?;
    let mut fields = after.split_whitespace();
    // After ")": field 3 (state) is the first; utime is field 14 → index 11.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// A running `perf stat` attached to a server.
#[derive(Debug)]
pub struct PerfStat {
    child: Child,
    out: PathBuf,
}

impl PerfStat {
    /// Attaches `perf stat` to `pid`, writing CSV to `out`. `None` when perf cannot start.
    pub fn start(pid: u32, out: &Path) -> Option<PerfStat> {
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter,context-switches",
                "-p",
            ])
            .arg(pid.to_string())
            .arg("-o")
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(PerfStat {
            child,
            out: out.to_owned(),
        })
    }

    /// Stops perf (SIGINT makes it print its counts) and returns `(syscalls, context switches)`.
    pub fn stop(mut self) -> (Option<u64>, Option<u64>) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        (
            perf_count(&text, "raw_syscalls:sys_enter"),
            perf_count(&text, "context-switches"),
        )
    }
}

/// The count of `event` in `perf stat -x,` output.
fn perf_count(text: &str, event: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split(',');
        let value = f.next()?;
        let _unit = f.next()?;
        (f.next()? == event).then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_after_command_with_spaces() {
        let line = "1234 (qemu nbd) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 1 0";
        assert_eq!(parse_stat_times(line), Some((250, 75)));
        assert_eq!(parse_stat_times("garbage"), None);
        assert!(cpu_seconds(std::process::id()).is_some());
    }

    #[test]
    fn perf_csv() {
        let text = "# started on x\n\n254120,,raw_syscalls:sys_enter,639342953,100.00,397.471,K/sec\n11118,,context-switches,639342953,100.00,17.390,K/sec\n";
        assert_eq!(perf_count(text, "raw_syscalls:sys_enter"), Some(254120));
        assert_eq!(perf_count(text, "context-switches"), Some(11118));
        assert_eq!(perf_count(text, "task-clock"), None);
        assert_eq!(
            perf_count("<not counted>,,context-switches,0,0", "context-switches"),
            None
        );
    }
}
