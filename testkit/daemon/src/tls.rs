//! TLS credentials for tests, made with the `openssl` command-line tool, in the layouts the real
//! clients and servers read:
//!
//! * x509 (QEMU's `tls-creds-x509`, nbdkit's `--tls-certificates`, libnbd's
//!   `tls-certificates=`): a folder per endpoint holding `ca-cert.pem` and
//!   `server-cert.pem`/`server-key.pem` or `client-cert.pem`/`client-key.pem`. The certificates
//!   carry the extensions GnuTLS (QEMU, libnbd, nbdkit) insists on: a CA with `keyCertSign`, leaf
//!   certificates with `digitalSignature,keyEncipherment` and the right extended key usage, and
//!   a server certificate naming `localhost` and `127.0.0.1`.
//! * PSK (QEMU's `tls-creds-psk` reads `keys.psk` in its folder; nbdkit's `--tls-psk=FILE`,
//!   libnbd's `tls-psk-file=`): lines `identity:hexkey`.
//!
//! A missing `openssl` tool fails the test loudly (scripts/test.sh installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

/// One certificate authority and the credentials it signed, under one folder.
#[derive(Debug, Clone)]
pub struct X509Creds {
    /// The CA's own folder (`ca-cert.pem`, `ca-key.pem`).
    pub ca_dir: PathBuf,
    /// A server endpoint's folder: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub server_dir: PathBuf,
    /// A client endpoint's folder: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    pub client_dir: PathBuf,
    /// The client certificate's subject DN in RFC 4514 (RFC 2253) form, `CN=NAME,O=addcow-tests`:
    /// the string QEMU's `authz-simple` and GnuTLS print, and authorization lists compare.
    pub client_dn: String,
}

fn openssl(cwd: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running openssl {args:?}: {e} (is the openssl tool installed?)")
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Makes a CA named `ca_name` and, signed by it, a server certificate for `localhost` /
/// `127.0.0.1` and a client certificate with subject `CN=client_cn,O=addcow-tests`, under
/// `dir` (folders `ca/`, `server/`, `client/`, created). Two calls with different `dir`s give
/// two unrelated CAs (a client of one is not trusted by a server of the other).
pub fn x509(dir: &Path, ca_name: &str, client_cn: &str) -> X509Creds {
    x509_for(dir, ca_name, client_cn, &["localhost", "127.0.0.1"])
}

/// [`x509`] with a server certificate naming `server_names` instead (each a DNS name or an IP
/// address; the first is also its CN): a certificate for another host, to test that a client
/// checks the name.
pub fn x509_for(dir: &Path, ca_name: &str, client_cn: &str, server_names: &[&str]) -> X509Creds {
    assert!(
        !server_names.is_empty(),
        "a server certificate needs a name"
    );
    let san: Vec<String> = server_names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(_) => format!("IP:{n}"),
            Err(_) => format!("DNS:{n}"),
        })
        .collect();
    let ca_dir = dir.join("ca");
    let server_dir = dir.join("server");
    let client_dir = dir.join("client");
    for d in [&ca_dir, &server_dir, &client_dir] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    }
    write(
        &ca_dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\n",
    );
    write(
        &ca_dir.join("server.ext"),
        &format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
            san.join(",")
        ),
    );
    write(
        &ca_dir.join("client.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=clientAuth\n",
    );
    let ca_subj = format!("/O=addcow-tests/CN={ca_name}");
    openssl(&ca_dir, &["genrsa", "-out", "ca-key.pem", "2048"]);
    openssl(
        &ca_dir,
        &[
            "req",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            &ca_subj,
            "-out",
            "ca.csr",
        ],
    );
    openssl(
        &ca_dir,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-signkey",
            "ca-key.pem",
            "-days",
            "3650",
            "-sha256",
            "-extfile",
            "ca.ext",
            "-out",
            "ca-cert.pem",
        ],
    );
    let leaf = |name: &str, subj: &str, ext: &str| {
        let key = format!("{name}-key.pem");
        let csr = format!("{name}.csr");
        let cert = format!("{name}-cert.pem");
        openssl(&ca_dir, &["genrsa", "-out", &key, "2048"]);
        openssl(
            &ca_dir,
            &["req", "-new", "-key", &key, "-subj", subj, "-out", &csr],
        );
        openssl(
            &ca_dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "3650",
                "-sha256",
                "-extfile",
                ext,
                "-out",
                &cert,
            ],
        );
    };
    leaf(
        "server",
        &format!("/O=addcow-tests/CN={}", server_names[0]),
        "server.ext",
    );
    leaf(
        "client",
        &format!("/O=addcow-tests/CN={client_cn}"),
        "client.ext",
    );
    let copy = |from: &str, to: &Path| {
        std::fs::copy(ca_dir.join(from), to)
            .unwrap_or_else(|e| panic!("copying {from} to {}: {e}", to.display()));
    };
    for (d, role) in [(&server_dir, "server"), (&client_dir, "client")] {
        copy("ca-cert.pem", &d.join("ca-cert.pem"));
        copy(
            &format!("{role}-cert.pem"),
            &d.join(format!("{role}-cert.pem")),
        );
        copy(
            &format!("{role}-key.pem"),
            &d.join(format!("{role}-key.pem")),
        );
    }
    X509Creds {
        ca_dir,
        server_dir,
        client_dir,
        client_dn: format!("CN={client_cn},O=addcow-tests"),
    }
}

/// Expired twins of `valid`'s leaf certificates: its server and client certificate requests
/// signed again by the same CA, valid only in January 2020, in the endpoint folders
/// `dir/server` and `dir/client` (created; same file names, same CA certificate, same keys).
/// Pairing one expired endpoint with a valid one of `valid` tests that the other side checks
/// the dates (nothing else differs). `openssl x509 -req` cannot back-date (3.0 refuses
/// `-days` below -1 and has no `-not_before`), so this signs with `openssl ca`, which takes
/// `-startdate`/`-enddate`, from a throwaway database under `dir/ca`.
pub fn x509_expired(valid: &X509Creds, dir: &Path) -> X509Creds {
    let ca_dir = dir.join("ca");
    let server_dir = dir.join("server");
    let client_dir = dir.join("client");
    for d in [&ca_dir, &server_dir, &client_dir] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    }
    write(&ca_dir.join("index.txt"), "");
    write(&ca_dir.join("serial"), "1000\n");
    write(
        &ca_dir.join("ca.cnf"),
        "[ca]\ndefault_ca = expired\n[expired]\ndatabase = index.txt\nserial = serial\n\
         new_certs_dir = .\ndefault_md = sha256\npolicy = any\nunique_subject = no\n\
         [any]\norganizationName = optional\ncommonName = supplied\n",
    );
    let from = |f: &str| {
        valid
            .ca_dir
            .join(f)
            .to_str()
            .expect("utf-8 path")
            .to_string()
    };
    for (d, role) in [(&server_dir, "server"), (&client_dir, "client")] {
        let cert = d.join(format!("{role}-cert.pem"));
        openssl(
            &ca_dir,
            &[
                "ca",
                "-config",
                "ca.cnf",
                "-batch",
                "-notext",
                "-cert",
                &from("ca-cert.pem"),
                "-keyfile",
                &from("ca-key.pem"),
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200201000000Z",
                "-extfile",
                &from(&format!("{role}.ext")),
                "-in",
                &from(&format!("{role}.csr")),
                "-out",
                cert.to_str().expect("utf-8 path"),
            ],
        );
        for f in ["ca-cert.pem".to_string(), format!("{role}-key.pem")] {
            std::fs::copy(valid.ca_dir.join(&f), d.join(&f))
                .unwrap_or_else(|e| panic!("copying {f} to {}: {e}", d.display()));
        }
    }
    X509Creds {
        ca_dir,
        server_dir,
        client_dir,
        client_dn: valid.client_dn.clone(),
    }
}

/// Writes a PSK file `dir/keys.psk` (the name QEMU's `tls-creds-psk` reads in its folder)
/// holding `identity:key` for each pair (`key` given as hex), and returns its path.
pub fn psk(dir: &Path, keys: &[(&str, &str)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let path = dir.join("keys.psk");
    let text: String = keys
        .iter()
        .map(|(id, key)| format!("{id}:{key}\n"))
        .collect();
    write(&path, &text);
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_certificate_verifies_against_its_ca_and_not_another() {
        let dir = tempfile::tempdir().unwrap();
        let a = x509(&dir.path().join("a"), "ca-a", "alice");
        let b = x509(&dir.path().join("b"), "ca-b", "bob");
        let verify = |ca: &Path, cert: &Path| {
            Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(ca)
                .arg(cert)
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(verify(
            &a.server_dir.join("ca-cert.pem"),
            &a.client_dir.join("client-cert.pem")
        ));
        assert!(verify(
            &a.client_dir.join("ca-cert.pem"),
            &a.server_dir.join("server-cert.pem")
        ));
        assert!(!verify(
            &a.server_dir.join("ca-cert.pem"),
            &b.client_dir.join("client-cert.pem")
        ));
        let subject = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"])
            .arg(a.client_dir.join("client-cert.pem"))
            .output()
            .unwrap();
        let subject = String::from_utf8_lossy(&subject.stdout);
        assert_eq!(subject.trim(), format!("subject={}", a.client_dn));
        // The expired twins: same CA, same subject, dates in the past.
        let x = x509_expired(&a, &dir.path().join("a-expired"));
        let check = |ca: &Path, cert: &Path| {
            let o = Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(ca)
                .arg(cert)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
        };
        for (dir, role) in [(&x.server_dir, "server"), (&x.client_dir, "client")] {
            let out = check(
                &a.ca_dir.join("ca-cert.pem"),
                &dir.join(format!("{role}-cert.pem")),
            );
            assert!(out.contains("certificate has expired"), "{role}: {out}");
        }
        let subject = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"])
            .arg(x.client_dir.join("client-cert.pem"))
            .output()
            .unwrap();
        let subject = String::from_utf8_lossy(&subject.stdout);
        assert_eq!(subject.trim(), format!("subject={}", x.client_dn));
        let p = psk(&dir.path().join("psk"), &[("alice", "0123456789abcdef")]);
        assert_eq!(
            std::fs::read_to_string(p).unwrap(),
            "alice:0123456789abcdef\n"
        );
    }
}
