//! Reloading the peer certificate while the agent runs, and watching it expire.
//!
//! The certificate directory (`--certs`: `cert.pem`, `key.pem`, `ca.pem`) is read again every
//! `--cert-reload-interval` and at once on SIGHUP. A reload happens when the three files'
//! content differs from what was last read: in Kubernetes the files of the mounted `cl-peer`
//! Secret are symbolic links through `..data`, which the kubelet points at a new directory by
//! a rename, so neither the names nor their times tell; the bytes do. The files are read twice
//! and must agree, so a read that straddles a swap (the old `cert.pem`, the new `key.pem`) is
//! taken again rather than refused.
//!
//! A new identity must pass every check the start-up passes ([`PeerFiles::identity`]); then
//! it is swapped into [`Credentials`], and new connections use it. Open connections keep the
//! configuration they started with. A reload that fails (half-written files, bad PEM, the
//! wrong name, an expired certificate) keeps the previous identity serving, logs the file at
//! fault once per distinct error, and counts `clink_certificate_reloads_total{result="error"}`.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{signal::unix::SignalKind, task::JoinHandle};
use tracing::{debug, error, info, warn};

use super::{Credentials, Expiry, PeerFiles, TlsError};
use crate::metrics::{Metrics, ReloadLabels};

/// `--cert-reload-interval` default: a rotated Secret is served within this of the kubelet
/// updating the volume (which itself takes up to a minute or so).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// With polling off (`--cert-reload-interval 0`), how often the expiry is still looked at.
const EXPIRY_CHECK: Duration = Duration::from_secs(60);
/// Reads of the three files that may disagree (a swap in between) before a reload gives up.
const SETTLE_READS: usize = 10;
const SETTLE_PAUSE: Duration = Duration::from_millis(20);

/// The agent's certificate directory, what was last read from it, and the [`Credentials`]
/// connections use.
pub struct Reloader {
    dir: PathBuf,
    name: String,
    credentials: Arc<Credentials>,
    /// The files last tried, loaded or not: a poll that finds the same bytes does nothing.
    last: PeerFiles,
    /// The last failed attempt's error: a broken file is logged and counted once per
    /// distinct error, not at every poll.
    last_error: Option<String>,
    /// Where the served certificate stood at the last look, so a change is logged once.
    expiry: Expiry,
}

/// What one look at the directory found.
#[derive(Debug)]
enum Attempt {
    /// The same bytes as last time.
    Unchanged,
    Loaded(PeerFiles, super::Identity),
    /// `files` is `None` when they could not be read at all.
    Failed(Option<PeerFiles>, TlsError),
}

impl Reloader {
    /// Loads the identity at start-up: any problem stops the agent, naming the file at fault.
    /// `ktls`: the kTLS data path runs (see [`Credentials::new`]).
    pub fn load(dir: &Path, name: &str, ktls: bool) -> Result<Reloader, TlsError> {
        let files = read_settled(dir)?;
        let identity = files.identity(name)?;
        let now = unix_now();
        info!(certificate = %identity.cert, dir = %dir.display(), "serving peer certificate");
        if let Some(warning) = identity.cert.expiry_warning(now) {
            warn!("{warning}");
        }
        Ok(Reloader {
            dir: dir.to_owned(),
            name: name.to_owned(),
            expiry: identity.cert.expiry(now),
            credentials: Arc::new(Credentials::new(identity, ktls)),
            last: files,
            last_error: None,
        })
    }

    /// The cell every new connection takes its TLS configuration from.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.clone()
    }

    /// Watches the directory in the background: every `interval` (`None`: only on SIGHUP)
    /// and on SIGHUP, until the task is dropped. The SIGHUP handler is installed before this
    /// returns, so a SIGHUP from then on reloads instead of ending the process.
    pub fn spawn(
        mut self,
        metrics: Arc<Metrics>,
        interval: Option<Duration>,
    ) -> std::io::Result<JoinHandle<()>> {
        let mut hangup = tokio::signal::unix::signal(SignalKind::hangup())?;
        metrics.set_certificate_not_after(self.credentials.cert().not_after);
        // Both series from the start, so `increase(...{result="error"}[5m])` alerts work.
        for result in ["ok", "error"] {
            let _ = metrics
                .certificate_reloads
                .get_or_create(&ReloadLabels { result });
        }
        Ok(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval.unwrap_or(EXPIRY_CHECK));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                let forced = tokio::select! {
                    _ = ticks.tick() => false,
                    Some(()) = hangup.recv() => true,
                };
                if forced {
                    info!(dir = %self.dir.display(), "SIGHUP: reloading the peer certificate");
                }
                if forced || interval.is_some() {
                    self.reload(forced, &metrics).await;
                }
                self.watch_expiry();
            }
        }))
    }

    /// One look at the directory (off the connection workers: it reads files and checks
    /// signatures), and what follows from it.
    async fn reload(&mut self, forced: bool, metrics: &Metrics) {
        let (dir, name, last) = (self.dir.clone(), self.name.clone(), self.last.clone());
        let attempt =
            tokio::task::spawn_blocking(move || attempt(&dir, &name, &last, forced)).await;
        let attempt = match attempt {
            Ok(attempt) => attempt,
            Err(e) => {
                error!(error = %e, "certificate reload task failed");
                return;
            }
        };
        match attempt {
            Attempt::Unchanged => {}
            Attempt::Loaded(files, identity) => {
                let previous = self.credentials.cert();
                let cert = identity.cert.clone();
                self.credentials.replace(identity);
                self.last = files;
                self.last_error = None;
                metrics.set_certificate_not_after(cert.not_after);
                count(metrics, "ok");
                info!(
                    certificate = %cert,
                    previous_serial = %previous.serial,
                    "peer certificate reloaded; new connections use it"
                );
                let now = unix_now();
                if let Some(warning) = cert.expiry_warning(now) {
                    warn!("{warning}");
                }
                self.expiry = cert.expiry(now);
            }
            Attempt::Failed(files, e) => {
                if let Some(files) = files {
                    self.last = files;
                }
                let message = e.to_string();
                if !forced && self.last_error.as_ref() == Some(&message) {
                    return;
                }
                self.last_error = Some(message);
                count(metrics, "error");
                let file = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                error!(
                    file = %file,
                    error = %e,
                    serving = %self.credentials.cert(),
                    "peer certificate not reloaded; still serving the previous one"
                );
            }
        }
    }

    /// Logs once when the served certificate comes within [`super::EXPIRY_WARNING`] of its
    /// expiry, and once when it expires.
    fn watch_expiry(&mut self) {
        let cert = self.credentials.cert();
        let now = unix_now();
        let expiry = cert.expiry(now);
        if expiry != self.expiry {
            self.expiry = expiry;
            if let Some(warning) = cert.expiry_warning(now) {
                warn!("{warning}");
            }
        }
    }
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .certificate_reloads
        .get_or_create(&ReloadLabels { result })
        .inc();
}

/// Reads the directory and, if its content is not `last` (or `forced`), builds and checks
/// the identity it holds.
fn attempt(dir: &Path, name: &str, last: &PeerFiles, forced: bool) -> Attempt {
    let files = match read_settled(dir) {
        Ok(files) => files,
        Err(e) => return Attempt::Failed(None, e),
    };
    if !forced && files == *last {
        return Attempt::Unchanged;
    }
    debug!(dir = %dir.display(), forced, "peer certificate files changed");
    match files.identity(name) {
        Ok(identity) => Attempt::Loaded(files, identity),
        Err(e) => Attempt::Failed(Some(files), e),
    }
}

/// The three files, read until two reads in a row agree.
fn read_settled(dir: &Path) -> Result<PeerFiles, TlsError> {
    let mut files = PeerFiles::read(dir)?;
    for _ in 0..SETTLE_READS {
        let again = PeerFiles::read(dir)?;
        if again == files {
            return Ok(files);
        }
        files = again;
        std::thread::sleep(SETTLE_PAUSE);
    }
    Err(TlsError::Invalid {
        path: dir.to_owned(),
        message: "the certificate files kept changing while being read".into(),
    })
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{create_fabric, create_peer_cert, CERT, KEY};

    /// A fabric with peer `peer-a` in `<dir>/peer-a`, and a second certificate for it in
    /// `<dir>/next/peer-a`.
    fn two_certificates() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        create_fabric("f", dir.path()).unwrap();
        create_peer_cert("peer-a", "f", dir.path()).unwrap();
        let next = dir.path().join("next");
        std::fs::create_dir(&next).unwrap();
        std::os::unix::fs::symlink(dir.path().join("f"), next.join("f")).unwrap();
        create_peer_cert("peer-a", "f", &next).unwrap();
        dir
    }

    fn copy(from: &Path, to: &Path, file: &str) {
        let tmp = to.join(".tmp");
        std::fs::copy(from.join(file), &tmp).unwrap();
        std::fs::rename(tmp, to.join(file)).unwrap();
    }

    #[test]
    fn a_change_is_loaded_the_same_bytes_are_not_and_a_bad_key_fails_naming_it() {
        let dir = two_certificates();
        let live = dir.path().join("peer-a");
        let first = read_settled(&live).unwrap();
        assert!(matches!(
            attempt(&live, "peer-a", &first, false),
            Attempt::Unchanged
        ));
        assert!(matches!(
            attempt(&live, "peer-a", &first, true),
            Attempt::Loaded(..)
        ));

        for file in [CERT, KEY] {
            copy(&dir.path().join("next/peer-a"), &live, file);
        }
        let Attempt::Loaded(second, identity) = attempt(&live, "peer-a", &first, false) else {
            panic!("the new certificate was not loaded");
        };
        let next_pem = std::fs::read(live.join(CERT)).unwrap();
        assert_eq!(
            identity.cert.serial,
            crate::tls::CertInfo::from_pem(&next_pem).unwrap().serial
        );

        std::fs::write(live.join(KEY), b"-----BEGIN PRIVATE KEY-----\ngarbage\n").unwrap();
        let Attempt::Failed(Some(_), e) = attempt(&live, "peer-a", &second, false) else {
            panic!("a garbage key was loaded");
        };
        assert_eq!(e.path(), Some(live.join(KEY).as_path()), "{e}");
    }

    #[test]
    fn credentials_swap_whole_and_count_generations() {
        let dir = two_certificates();
        let first = crate::tls::Identity::load(&dir.path().join("peer-a"), "peer-a").unwrap();
        let second = crate::tls::Identity::load(&dir.path().join("next/peer-a"), "peer-a").unwrap();
        let credentials = Credentials::new(first.clone(), false);
        let (client, generation) = credentials.client();
        assert!(Arc::ptr_eq(&client, &first.client));
        credentials.replace(second.clone());
        assert_eq!(credentials.generation(), generation + 1);
        assert!(Arc::ptr_eq(&credentials.server(), &second.server));
        assert_eq!(credentials.cert(), second.cert);

        let ktls = Credentials::new(first, true);
        assert_eq!(ktls.server().send_tls13_tickets, 0);
        ktls.replace(second);
        assert_eq!(
            ktls.server().send_tls13_tickets,
            0,
            "a reload keeps the kTLS settings"
        );
        assert!(ktls.client().0.enable_secret_extraction);
    }
}
