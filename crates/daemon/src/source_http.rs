//! The HTTP(S) source: polls a URL with If-None-Match, so an unchanged ruleset costs a 304 and
//! no download. A fetched body is stored under the instance's state directory and applied from
//! there; on any failure (network, status, or a ruleset the pipeline rejects) the last good
//! ruleset keeps serving. Failed fetches back off exponentially with full jitter (a random
//! delay between 0 and a cap that doubles per failure), so many daemons pointed at one server
//! that comes back do not return in step.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use rand::Rng;
use reqwest::{StatusCode, header};

use super::{
    Applier, Context, Outcome, ReloadStats, RunConfig,
    metrics::{MetricsSource, escape_label, family},
};

/// A ruleset larger than this is refused rather than buffered (1M prefixes inline are ~25 MB):
/// the largest rules text the parser accepts.
const MAX_BODY: usize = xdpfw_rules::MAX_RULES_TEXT as usize;

/// The addresses the URL's host resolves to, with the port: what --fail-closed lets through.
/// An invalid URL is an error; a name that does not resolve (DNS down at boot) is not, since
/// failing here would leave the interface with no firewall at all: the daemon attaches and
/// retries, without the server's pass rule until a later start resolves it.
pub(crate) async fn server_addrs(url: &str) -> Result<Vec<SocketAddr>> {
    let u = reqwest::Url::parse(url).with_context(|| format!("invalid URL {}", redact_url(url)))?;
    if !matches!(u.scheme(), "http" | "https") {
        bail!("unsupported URL scheme {} (http or https)", u.scheme());
    }
    let host = u.host_str().context("the URL has no host")?.trim_matches(['[', ']']).to_string();
    let port = u.port_or_known_default().context("the URL has no port")?;
    match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(addrs) => Ok(addrs.collect()),
        Err(e) => {
            tracing::warn!("cannot resolve {host} now ({e}); a fail-closed ruleset would not let its replies through");
            Ok(Vec::new())
        }
    }
}

/// The URL as logs and metrics labels show it: credentials (user and password) and the values of
/// query parameters (tokens, signatures) replaced by `***`, the fragment dropped.
pub(crate) fn redact_url(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else { return "<an invalid URL>".into() };
    if !u.username().is_empty() {
        let _ = u.set_username("***");
    }
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query().is_some() {
        let keys: Vec<String> = u.query_pairs().map(|(k, _)| k.into_owned()).collect();
        let redacted: Vec<String> = keys.iter().map(|k| format!("{}=***", k.replace(['&', '=', '#'], "_"))).collect();
        u.set_query(Some(&redacted.join("&")));
    }
    u.set_fragment(None);
    u.to_string()
}

/// The redirect policy: to the same host and port only (and never from https to http), unless
/// `any_host`; at most 10 in a row.
fn redirect_policy(any_host: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("more than 10 redirects");
        }
        let first = &attempt.previous()[0];
        let next = attempt.url();
        let downgrade = first.scheme() == "https" && next.scheme() != "https";
        let same = next.host_str() == first.host_str() && next.port_or_known_default() == first.port_or_known_default();
        if downgrade {
            attempt.error("a redirect from https to http is refused")
        } else if !same && !any_host {
            let to = format!("{}:{}", next.host_str().unwrap_or("?"), next.port_or_known_default().unwrap_or(0));
            attempt.error(format!("a redirect to another host ({to}) is refused; allow it with --allow-redirect-host"))
        } else {
            attempt.follow()
        }
    })
}

#[derive(Default)]
struct FetchStats {
    ok: AtomicU64,
    not_modified: AtomicU64,
    failed: AtomicU64,
    consecutive_failures: AtomicU64,
    /// f64 bits: the current backoff cap and the delay drawn under it (0 when not backing off).
    backoff_cap: AtomicU64,
    backoff_delay: AtomicU64,
}

struct FetchMetrics(Arc<FetchStats>, String);

impl MetricsSource for FetchMetrics {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let (s, url) = (&self.0, escape_label(&self.1));
        family(out, "xdpfw_source_fetches_total", "counter", "Requests to the rules URL by result (not_modified: 304, the ETag matched).");
        for (result, n) in [("ok", &s.ok), ("not_modified", &s.not_modified), ("failed", &s.failed)] {
            let _ = writeln!(out, "xdpfw_source_fetches_total{{url=\"{url}\",result=\"{result}\"}} {}", n.load(Ordering::Relaxed));
        }
        family(out, "xdpfw_source_consecutive_failures", "gauge", "Failed fetches since the last successful one.");
        let _ = writeln!(out, "xdpfw_source_consecutive_failures{{url=\"{url}\"}} {}", s.consecutive_failures.load(Ordering::Relaxed));
        family(out, "xdpfw_source_backoff_cap_seconds", "gauge", "Upper bound of the current backoff (doubles per failure up to --backoff-max; 0: not backing off).");
        let _ = writeln!(out, "xdpfw_source_backoff_cap_seconds{{url=\"{url}\"}} {}", f64::from_bits(s.backoff_cap.load(Ordering::Relaxed)));
        family(out, "xdpfw_source_backoff_seconds", "gauge", "The delay drawn under the cap before the next attempt (0: not backing off).");
        let _ = writeln!(out, "xdpfw_source_backoff_seconds{{url=\"{url}\"}} {}", f64::from_bits(s.backoff_delay.load(Ordering::Relaxed)));
    }
}

enum Fetched {
    NotModified,
    Body(Vec<u8>, Option<String>),
}

pub(crate) struct HttpSource {
    url: String,
    /// The URL without its secrets ([`redact_url`]): what logs and metrics labels show.
    shown: String,
    poll: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    client: reqwest::Client,
    /// Used while the fail-closed ruleset is live: pinned to the addresses that ruleset lets
    /// through, since DNS answers would be dropped.
    pinned: Option<reqwest::Client>,
    reload: Arc<ReloadStats>,
    stats: Arc<FetchStats>,
}

impl HttpSource {
    pub(crate) fn new(url: &str, args: &RunConfig, server: &[SocketAddr], reload: Arc<ReloadStats>) -> Result<Self> {
        let extra_roots = match &args.ca_cert {
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("{}: not PEM certificates", path.display()))?;
                if certs.is_empty() {
                    bail!("{}: no certificate in it", path.display());
                }
                certs
            }
            None => Vec::new(),
        };
        let builder = || {
            let mut b = reqwest::Client::builder()
                .redirect(redirect_policy(args.allow_redirect_host))
                .timeout(args.fetch_timeout)
                .connect_timeout(args.fetch_timeout)
                .user_agent(concat!("xdpfw-loader/", env!("CARGO_PKG_VERSION")));
            for c in &extra_roots {
                b = b.add_root_certificate(c.clone());
            }
            b
        };
        let host = reqwest::Url::parse(url)?.host_str().unwrap_or_default().trim_matches(['[', ']']).to_string();
        let pinned = if args.fail_closed && !server.is_empty() && host.parse::<std::net::IpAddr>().is_err() {
            Some(builder().resolve_to_addrs(&host, server).build()?)
        } else {
            None
        };
        Ok(Self {
            url: url.to_string(),
            shown: redact_url(url),
            poll: args.poll_interval,
            backoff_initial: args.backoff_initial,
            backoff_max: args.backoff_max,
            client: builder().build()?,
            pinned,
            reload,
            stats: Arc::default(),
        })
    }

    pub(crate) fn metrics(&self) -> Arc<dyn MetricsSource> {
        Arc::new(FetchMetrics(self.stats.clone(), self.shown.clone()))
    }

    async fn fetch(&self, etag: Option<&str>) -> Result<Fetched> {
        let client = match &self.pinned {
            Some(c) if self.reload.fail_closed.load(Ordering::Relaxed) => c,
            _ => &self.client,
        };
        let mut req = client.get(&self.url);
        if let Some(tag) = etag {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        // reqwest's errors name the URL, credentials included: said without it.
        let mut resp = req.send().await.map_err(|e| anyhow::anyhow!(e.without_url()))?;
        match resp.status() {
            StatusCode::NOT_MODIFIED => return Ok(Fetched::NotModified),
            StatusCode::OK => {}
            s => bail!("HTTP status {s}"),
        }
        let tag = resp.headers().get(header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| anyhow::anyhow!(e.without_url()))? {
            if body.len() + chunk.len() > MAX_BODY {
                bail!("the ruleset is larger than {MAX_BODY} bytes");
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched::Body(body, tag))
    }

    /// Full jitter: uniform in [0, cap], cap = initial × 2^(failures−1), at most backoff_max.
    fn backoff(&self, failures: u32) -> (Duration, Duration) {
        let cap = self.backoff_initial.saturating_mul(1u32 << (failures.saturating_sub(1)).min(20)).min(self.backoff_max);
        let delay = Duration::from_secs_f64(rand::rng().random_range(0.0..=cap.as_secs_f64()));
        (cap, delay)
    }

    pub(crate) async fn run(self, ctx: Context, applier: Arc<Applier>) -> Result<()> {
        // In the instance's root-only runtime folder: no other user can plant, read or swap it.
        let body_path: PathBuf = ctx.inst.state_dir.join("fetched.toml");
        let mut hup = ctx.hup.clone();
        let mut etag: Option<String> = None;
        let mut failures = 0u32;
        let mut force = false;
        tracing::info!("following {} (every {:?})", self.shown, self.poll);
        loop {
            // SIGHUP asks for the source as it is now: an unconditional GET.
            let tag = if force { None } else { etag.clone() };
            let delay = match self.fetch(tag.as_deref()).await {
                Ok(fetched) => {
                    failures = 0;
                    self.stats.consecutive_failures.store(0, Ordering::Relaxed);
                    self.stats.backoff_cap.store(0f64.to_bits(), Ordering::Relaxed);
                    self.stats.backoff_delay.store(0f64.to_bits(), Ordering::Relaxed);
                    match fetched {
                        Fetched::NotModified => {
                            self.stats.not_modified.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!("{}: not modified", self.shown);
                        }
                        Fetched::Body(body, tag) => {
                            self.stats.ok.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = store(&ctx.inst, &body_path, body).await {
                                // The ETag is not remembered, so the next poll downloads it again.
                                tracing::error!("cannot store the ruleset from {}: {e:#}", self.shown);
                            } else {
                                match applier.apply(&body_path, &ctx.shutdown).await.0 {
                                    Outcome::Applied(_) | Outcome::Unchanged | Outcome::Stopped => {}
                                    Outcome::Failed(why) => tracing::error!("the ruleset from {} was rejected: {why}", self.shown),
                                }
                                // Kept even for a rejected body: it is not worth downloading
                                // again until the server changes it, and the rejection is
                                // already reported (log, metrics, history).
                                etag = tag;
                            }
                        }
                    }
                    self.poll
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let (cap, delay) = self.backoff(failures);
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    self.stats.consecutive_failures.store(failures.into(), Ordering::Relaxed);
                    self.stats.backoff_cap.store(cap.as_secs_f64().to_bits(), Ordering::Relaxed);
                    self.stats.backoff_delay.store(delay.as_secs_f64().to_bits(), Ordering::Relaxed);
                    tracing::warn!(
                        "fetching {} failed ({failures} in a row): {e:#}; the last good ruleset keeps serving; retrying in {:.3}s (backoff cap {:.3}s)",
                        self.shown,
                        delay.as_secs_f64(),
                        cap.as_secs_f64()
                    );
                    delay
                }
            };
            force = false;
            tokio::select! {
                _ = ctx.shutdown.wait() => return Ok(()),
                _ = hup.changed() => force = true,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Writes atomically (a temporary file created exclusively, never through a symlink, in the
/// private folder), so the pipeline (or `rollback`) never reads half a body.
async fn store(inst: &Arc<xdpfw_control::Instance>, path: &std::path::Path, body: Vec<u8>) -> Result<()> {
    let (inst, path) = (inst.clone(), path.to_path_buf());
    tokio::task::spawn_blocking(move || -> Result<()> {
        inst.ensure_state_dir()?;
        xdpfw_control::files::atomic_write(&path, &body)?;
        Ok(())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_secrets() {
        assert_eq!(redact_url("https://alice:s3cret@rules.example/r.toml?token=abc&v=1#frag"), "https://***:***@rules.example/r.toml?token=***&v=***");
        assert_eq!(redact_url("http://192.0.2.1:8080/rules.toml"), "http://192.0.2.1:8080/rules.toml");
        assert_eq!(redact_url("not a url s3cret"), "<an invalid URL>");
    }

    #[test]
    fn backoff_doubles_to_the_max_with_jitter_under_the_cap() {
        let src = HttpSource {
            url: "http://192.0.2.1/".into(),
            shown: "http://192.0.2.1/".into(),
            poll: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            client: reqwest::Client::new(),
            pinned: None,
            reload: Arc::default(),
            stats: Arc::default(),
        };
        let caps: Vec<u128> = (1..=6).map(|n| src.backoff(n).0.as_millis()).collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(src.backoff(u32::MAX).0, Duration::from_secs(1), "no overflow");
        for n in 1..50 {
            let (cap, delay) = src.backoff(n);
            assert!(delay <= cap);
        }
    }
}
