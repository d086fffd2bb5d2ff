//! Samples, goals and the report: a Markdown table on stdout, the raw
//! samples as CSV and the latency plot beside the build's temporary files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Default, Clone, Debug)]
pub struct Samples {
    /// Milliseconds, MiB, KiB or a plain ratio, as `unit` says.
    pub values: Vec<f64>,
    pub unit: &'static str,
}

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.unit = "ms";
        self.values.push(ms(d));
    }

    pub fn push_kib_as_mib(&mut self, kib: u64) {
        self.unit = "MiB";
        self.values.push(kib as f64 / 1024.0);
    }

    pub fn push_value(&mut self, v: f64, unit: &'static str) {
        self.unit = unit;
        self.values.push(v);
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn sorted(&self) -> Vec<f64> {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn median(&self) -> Option<f64> {
        let v = self.sorted();
        let n = v.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    /// Nearest-rank percentile.
    pub fn percentile(&self, q: f64) -> Option<f64> {
        let v = self.sorted();
        if v.is_empty() {
            return None;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(v[rank - 1])
    }

    pub fn max(&self) -> Option<f64> {
        self.sorted().last().copied()
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Goal {
    None,
    MedianMs(f64),
    P99Ms(f64),
    MaxMs(f64),
    MaxMib(f64),
    MaxKib(f64),
}

impl Goal {
    fn text(self) -> String {
        match self {
            Goal::None => "—".into(),
            Goal::MedianMs(g) => format!("median ≤ {g} ms"),
            Goal::P99Ms(g) => format!("p99 ≤ {g} ms"),
            Goal::MaxMs(g) => format!("every call ≤ {g} ms"),
            Goal::MaxMib(g) => format!("every call ≤ {g} MiB"),
            Goal::MaxKib(g) => format!("each ≤ {g} KiB"),
        }
    }

    fn verdict(self, s: &Samples) -> &'static str {
        let (Some(max), Some(median), Some(p99)) = (s.max(), s.median(), s.percentile(0.99)) else {
            return "—";
        };
        let met = match self {
            Goal::None => return "—",
            Goal::MedianMs(g) => median <= g,
            Goal::P99Ms(g) => p99 <= g,
            Goal::MaxMs(g) | Goal::MaxMib(g) | Goal::MaxKib(g) => max <= g,
        };
        if met { "met" } else { "**missed**" }
    }
}

pub struct Row {
    pub section: String,
    pub name: String,
    pub samples: Samples,
    pub goal: Goal,
    /// Which panel of the plot shows this row's distribution, if any.
    pub plot: Option<&'static str>,
}

/// popivr against something else, by medians.
pub struct Ratio {
    pub figure: String,
    pub ours: Option<f64>,
    pub theirs: Option<f64>,
    pub unit: &'static str,
    pub against: &'static str,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
    pub phases: Vec<(String, Phases)>,
    pub notes: Vec<String>,
    section: String,
}

impl Report {
    pub fn section(&mut self, title: &str) {
        self.section = title.to_string();
        println!("== {title}");
    }

    pub fn row(&mut self, name: &str, samples: Samples, goal: Goal) {
        self.row_plot(name, samples, goal, None);
    }

    pub fn row_plot(
        &mut self,
        name: &str,
        samples: Samples,
        goal: Goal,
        plot: Option<&'static str>,
    ) {
        let f = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.2}"));
        println!(
            "   {name}: N={} median {} p99 {} {}",
            samples.len(),
            f(samples.median()),
            f(samples.percentile(0.99)),
            samples.unit
        );
        self.rows.push(Row {
            section: self.section.clone(),
            name: name.to_string(),
            samples,
            goal,
            plot,
        });
    }

    pub fn ratio(&mut self, figure: &str, ours: &Samples, theirs: &Samples, against: &'static str) {
        self.ratios.push(Ratio {
            figure: figure.to_string(),
            ours: ours.median(),
            theirs: theirs.median(),
            unit: ours.unit,
            against,
        });
    }

    pub fn phases(&mut self, name: &str, phases: Phases) {
        self.phases.push((name.to_string(), phases));
    }

    pub fn note(&mut self, text: String) {
        println!("   note: {text}");
        self.notes.push(text);
    }

    pub fn markdown(&self, full: bool) -> String {
        let f = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.2}"));
        let mut out = String::new();
        if !full {
            let _ = writeln!(
                out,
                "smoke run (one call of each kind): figures mean nothing, no verdicts\n"
            );
        }
        let mut section = "";
        for r in &self.rows {
            if r.section != section {
                section = &r.section;
                let _ = writeln!(out, "\n### {section}\n");
                let _ = writeln!(
                    out,
                    "| measure | N | median | p90 | p99 | max | unit | goal | verdict |"
                );
                let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|---|---|---|");
            }
            let s = &r.samples;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                s.len(),
                f(s.median()),
                f(s.percentile(0.9)),
                f(s.percentile(0.99)),
                f(s.max()),
                s.unit,
                r.goal.text(),
                if full { r.goal.verdict(s) } else { "—" },
            );
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(out, "\n### Ratios (medians of the same run)\n");
            let _ = writeln!(
                out,
                "| figure | popivr | other | against | popivr / other |"
            );
            let _ = writeln!(out, "|---|--:|--:|---|--:|");
            for r in &self.ratios {
                let ratio = match (r.ours, r.theirs) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
                    _ => "—".into(),
                };
                let _ = writeln!(
                    out,
                    "| {} | {} {} | {} {} | {} | {ratio} |",
                    r.figure,
                    f(r.ours),
                    r.unit,
                    f(r.theirs),
                    r.unit,
                    r.against
                );
            }
        }
        for (title, phases) in &self.phases {
            let _ = writeln!(out, "\n### {title} (ms)\n");
            let _ = writeln!(out, "| phase | N | median | p90 |");
            let _ = writeln!(out, "|---|--:|--:|--:|");
            for name in &phases.order {
                let s = &phases.by_name[name];
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} |",
                    s.len(),
                    f(s.median()),
                    f(s.percentile(0.9))
                );
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    /// The table (`report.md`), raw samples (`samples.csv`: plot panel,
    /// series, unit, value) into `dir`.
    pub fn write_files(&self, dir: &Path, full: bool) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let mut csv = String::from("panel,series,unit,value\n");
        for r in &self.rows {
            let panel = r.plot.unwrap_or("");
            for v in &r.samples.values {
                let _ = writeln!(
                    csv,
                    "{panel},\"{}\",{},{v:.4}",
                    r.name.replace('"', "'"),
                    r.samples.unit
                );
            }
        }
        let csv_path = dir.join("samples.csv");
        std::fs::write(&csv_path, csv)?;
        std::fs::write(dir.join("report.md"), self.markdown(full))?;
        Ok(csv_path)
    }
}

/// Per-phase durations over many logins.
#[derive(Default)]
pub struct Phases {
    order: Vec<String>,
    by_name: std::collections::BTreeMap<String, Samples>,
}

impl Phases {
    pub fn push(&mut self, name: &str, d: Duration) {
        if !self.order.iter().any(|o| o == name) {
            self.order.push(name.to_string());
        }
        self.by_name.entry(name.to_string()).or_default().push(d);
    }

    pub fn add(&mut self, wall: Duration, timings: &popivr::xmpp::LoginTimings) {
        for (phase, d) in &timings.phases {
            self.push(&phase.to_string(), *d);
        }
        self.push(
            "set-up before connect (CA file, TLS config)",
            wall.saturating_sub(timings.total),
        );
        self.push("login() wall", wall);
    }

    pub fn merge(&mut self, other: Phases) {
        for name in other.order {
            for v in &other.by_name[&name].values {
                self.push(&name, Duration::from_secs_f64(v / 1000.0));
            }
        }
    }
}

/// The first three figures of `/proc/loadavg`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Cores, CPU model and kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {}", kernel.trim())
}
