//! Prometheus metrics (text exposition format 0.0.4) at `/metrics`.
//!
//! The endpoint renders a list of [`MetricsSource`]s, so any service of the daemon can register
//! its own counters. Global packet counters come from the serde fields of
//! [`xdpfw_common::GlobalStats`], so a counter added there appears here without a change.

use std::{
    fmt::Write,
    sync::{Arc, RwLock, atomic::Ordering},
};

use anyhow::Result;
use axum::{Router, extract::State, http::header, routing::get};

use super::{ReloadStats, Shutdown};
use xdpfw_control::{self as control, Instance};

/// Something that adds metric families to a scrape. `render` runs on a blocking thread, so it
/// may read maps or files; it must write complete families (HELP, TYPE, samples).
pub trait MetricsSource: Send + Sync {
    fn render(&self, out: &mut String);
}

#[derive(Default)]
pub struct Registry {
    sources: RwLock<Vec<Arc<dyn MetricsSource>>>,
}

impl Registry {
    pub fn register(&self, source: Arc<dyn MetricsSource>) {
        self.sources.write().unwrap_or_else(|e| e.into_inner()).push(source);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in self.sources.read().unwrap_or_else(|e| e.into_inner()).iter() {
            s.render(&mut out);
        }
        out
    }
}

/// A label value with `\`, `"` and newlines escaped, as the text format requires.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Writes the HELP and TYPE lines of one family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Serves `registry` on `listener` until shutdown.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>, shutdown: Shutdown) -> Result<()> {
    async fn scrape(State(registry): State<Arc<Registry>>) -> impl axum::response::IntoResponse {
        let body = tokio::task::spawn_blocking(move || registry.render()).await.unwrap_or_else(|e| format!("# render failed: {e}\n"));
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
    }
    let app = Router::new().route("/metrics", get(scrape)).with_state(registry);
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.wait().await }).await?;
    Ok(())
}

/// The daemon's reload attempts and the timing of the last successful one.
pub struct ReloadMetrics(pub Arc<ReloadStats>);

impl MetricsSource for ReloadMetrics {
    fn render(&self, out: &mut String) {
        let s = &self.0;
        family(out, "xdpfw_reloads_total", "counter", "Reloads the daemon attempted, by result (failed: the live ruleset kept serving).");
        let _ = writeln!(out, "xdpfw_reloads_total{{result=\"ok\"}} {}", s.ok.load(Ordering::Relaxed));
        let _ = writeln!(out, "xdpfw_reloads_total{{result=\"failed\"}} {}", s.failed.load(Ordering::Relaxed));
        family(out, "xdpfw_reloads_unchanged_total", "counter", "Source changes whose ruleset was already live (no reload).");
        let _ = writeln!(out, "xdpfw_reloads_unchanged_total {}", s.unchanged.load(Ordering::Relaxed));
        family(out, "xdpfw_last_reload_timestamp_seconds", "gauge", "Unix time of the last reload attempt (0: none yet).");
        let _ = writeln!(out, "xdpfw_last_reload_timestamp_seconds {}", f64::from_bits(s.last_attempt_unix.load(Ordering::Relaxed)));
        family(out, "xdpfw_last_reload_success_timestamp_seconds", "gauge", "Unix time of the last successful reload (0: none yet).");
        let _ = writeln!(out, "xdpfw_last_reload_success_timestamp_seconds {}", f64::from_bits(s.last_success_unix.load(Ordering::Relaxed)));
        family(out, "xdpfw_last_reload_success", "gauge", "1 if the last reload attempt succeeded (1 before any attempt).");
        let _ = writeln!(out, "xdpfw_last_reload_success {}", u8::from(s.last_ok.load(Ordering::Relaxed)));
        family(out, "xdpfw_fail_closed", "gauge", "1 while the built-in drop-all ruleset of --fail-closed is live.");
        let _ = writeln!(out, "xdpfw_fail_closed {}", u8::from(s.fail_closed.load(Ordering::Relaxed)));
        family(out, "xdpfw_repairs_total", "counter", "Times the instance had stopped filtering (detached, pins removed, bpffs unmounted) and the daemon attached it again.");
        let _ = writeln!(out, "xdpfw_repairs_total {}", s.repairs.load(Ordering::Relaxed));

        let report = s.last_report.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(r) = report {
            // Every `*_us` field of ReloadTimes is a phase, so new phases show up here as well.
            family(out, "xdpfw_last_reload_phase_seconds", "gauge", "Duration of each phase of the last successful reload (total: all of them).");
            if let Ok(serde_json::Value::Object(times)) = serde_json::to_value(&r.times) {
                for (k, v) in &times {
                    if let (Some(phase), Some(us)) = (k.strip_suffix("_us"), v.as_u64()) {
                        let _ = writeln!(out, "xdpfw_last_reload_phase_seconds{{phase=\"{}\"}} {}", escape_label(phase), us as f64 / 1e6);
                    }
                }
            }
            family(out, "xdpfw_last_reload_self_tests", "gauge", "[[test]] packets proven in the kernel by the last successful reload.");
            let _ = writeln!(out, "xdpfw_last_reload_self_tests {}", r.times.self_tests);
        }
    }
}

/// What the kernel says now: generation, ruleset, global and per-rule counters.
pub struct KernelMetrics(pub Arc<Instance>);

impl MetricsSource for KernelMetrics {
    fn render(&self, out: &mut String) {
        let stats = match control::stats(&self.0) {
            Ok(s) => s,
            Err(e) => {
                // A scrape during a reload's flip can miss the state; the next one will not.
                let _ = writeln!(out, "# kernel counters unavailable: {}", format!("{e:#}").replace('\n', " "));
                return;
            }
        };
        family(out, "xdpfw_generation", "gauge", "Generation of the live ruleset (one more per reload).");
        let _ = writeln!(out, "xdpfw_generation{{iface=\"{}\"}} {}", escape_label(&stats.iface), stats.generation);
        let r = &stats.ruleset;
        family(out, "xdpfw_ruleset_info", "gauge", "The live ruleset: version label, content hash, default action.");
        let _ = writeln!(
            out,
            "xdpfw_ruleset_info{{iface=\"{}\",version=\"{}\",hash=\"{}\",default=\"{}\"}} 1",
            escape_label(&stats.iface),
            escape_label(r.version.as_deref().unwrap_or("")),
            escape_label(&r.hash),
            escape_label(&r.default)
        );
        family(out, "xdpfw_rules", "gauge", "Rules in the live ruleset.");
        let _ = writeln!(out, "xdpfw_rules{{iface=\"{}\"}} {}", escape_label(&stats.iface), r.rules.len());

        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(stats.global) {
            for (name, v) in &fields {
                let Some(v) = v.as_u64() else { continue };
                let metric = format!("xdpfw_{name}_total");
                family(out, &metric, "counter", &format!("Global counter `{name}` of the XDP program (GlobalStats), summed over CPUs."));
                let _ = writeln!(out, "{metric}{{iface=\"{}\"}} {v}", escape_label(&stats.iface));
            }
        }

        if let Some(f) = &stats.flows {
            let iface = escape_label(&stats.iface);
            family(out, "xdpfw_flow_entries", "gauge", "Entries of the flow table of `state` rules (expired ones until evicted or refreshed).");
            let _ = writeln!(out, "xdpfw_flow_entries{{iface=\"{iface}\"}} {}", f.entries);
            family(out, "xdpfw_flows_evicted_total", "counter", "Flows pushed out of the full flow table by newer ones (recorded - closed - entries).");
            let _ = writeln!(out, "xdpfw_flows_evicted_total{{iface=\"{iface}\"}} {}", f.evicted);
        }

        // Per-rule counters carry over reloads by rule name (control's State::carried), so a
        // series is identified by the rule's name alone: inserting or moving a rule moves no
        // series, and a rule that keeps its name keeps counting up. Its index and action are in
        // xdpfw_rule_info, joined on `rule` when wanted.
        for (metric, help, bytes) in [
            ("xdpfw_rule_packets_total", "Packets decided by each rule, by name, over every generation that had a rule of that name (rule=\"(default)\": no rule matched).", false),
            ("xdpfw_rule_bytes_total", "Bytes of the packets decided by each rule, by name, over every generation that had a rule of that name.", true),
        ] {
            family(out, metric, "counter", help);
            for c in &stats.rules {
                let _ = writeln!(
                    out,
                    "{metric}{{iface=\"{}\",rule=\"{}\"}} {}",
                    escape_label(&stats.iface),
                    escape_label(&c.name),
                    if bytes { c.bytes } else { c.packets }
                );
            }
        }
        family(out, "xdpfw_rule_info", "gauge", "Each rule of the live ruleset: its position (index, \"default\" for the default action) and action.");
        for c in &stats.rules {
            let _ = writeln!(
                out,
                "xdpfw_rule_info{{iface=\"{}\",rule=\"{}\",index=\"{}\",action=\"{}\"}} 1",
                escape_label(&stats.iface),
                escape_label(&c.name),
                c.index.map_or("default".to_string(), |i| i.to_string()),
                escape_label(&c.action)
            );
        }
    }
}

/// `xdpfw_build_info`: the running binary's version, as Prometheus convention has it.
pub struct BuildInfo;

impl MetricsSource for BuildInfo {
    fn render(&self, out: &mut String) {
        family(out, "xdpfw_build_info", "gauge", "The running loader: its version (always 1).");
        let _ = writeln!(out, "xdpfw_build_info{{version=\"{}\"}} 1", escape_label(env!("CARGO_PKG_VERSION")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("two\nlines"), "two\\nlines");
        assert_eq!(escape_label("plain-name_1"), "plain-name_1");
    }

    struct Fixed(&'static str);
    impl MetricsSource for Fixed {
        fn render(&self, out: &mut String) {
            family(out, self.0, "counter", "test");
            let _ = writeln!(out, "{} 1", self.0);
        }
    }

    #[test]
    fn registry_renders_every_source_in_order() {
        let r = Registry::default();
        r.register(Arc::new(Fixed("a_total")));
        r.register(Arc::new(Fixed("b_total")));
        let text = r.render();
        assert_eq!(text, "# HELP a_total test\n# TYPE a_total counter\na_total 1\n# HELP b_total test\n# TYPE b_total counter\nb_total 1\n");
    }

    #[test]
    fn reload_metrics_name_every_phase() {
        let stats = Arc::new(ReloadStats::default());
        // From JSON, so fields added to the report later (with serde defaults) need no change here.
        let report: xdpfw_control::ReloadReport = serde_json::from_value(serde_json::json!({
            "iface": "x", "previous_generation": 1, "generation": 2, "buffer": 0,
            "ruleset": { "path": null, "version": null, "hash": "h", "default": "pass", "rules": [], "actions": [], "prefixes": 0, "table_entries": 0 },
            "grace_method": "membarrier",
            "times": { "parse_us": 1500, "compile_us": 0, "lock_wait_us": 0, "install_arrays_us": 0, "install_tables_us": 0, "self_tests": 0,
                       "prove_us": 0, "flip_us": 0, "grace_us": 7000, "clear_us": 0, "total_us": 9000 },
            "warnings": []
        }))
        .expect("a report");
        stats.record(&Ok(report));
        let mut out = String::new();
        ReloadMetrics(stats).render(&mut out);
        assert!(out.contains("xdpfw_reloads_total{result=\"ok\"} 1\n"), "{out}");
        assert!(out.contains("xdpfw_last_reload_phase_seconds{phase=\"parse\"} 0.0015\n"), "{out}");
        assert!(out.contains("xdpfw_last_reload_phase_seconds{phase=\"grace\"} 0.007\n"), "{out}");
        assert!(out.contains("xdpfw_last_reload_phase_seconds{phase=\"total\"} 0.009\n"), "{out}");
        assert!(out.contains("xdpfw_last_reload_success 1\n"));
    }
}
