//! The benchmark's table: printed, and written to target/bench/report.md and report.json.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// One measured figure, its reference and its target.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub measure: String,
    pub value: String,
    /// The same measure for the reference, in the same run.
    pub reference: String,
    /// value / reference, or reference / value for latencies (bigger is better).
    pub ratio: Option<f64>,
    pub target: String,
    /// None when the row has no target.
    pub met: Option<bool>,
}

impl Row {
    pub fn new(
        scenario: &'static str,
        measure: impl Into<String>,
        value: impl Into<String>,
    ) -> Row {
        Row {
            scenario,
            measure: measure.into(),
            value: value.into(),
            reference: String::new(),
            ratio: None,
            target: String::new(),
            met: None,
        }
    }

    pub fn reference(mut self, reference: impl Into<String>, ratio: f64) -> Row {
        self.reference = reference.into();
        self.ratio = Some(ratio);
        self
    }

    pub fn target(mut self, target: impl Into<String>, met: bool) -> Row {
        self.target = target.into();
        self.met = Some(met);
        self
    }
}

pub fn write(rows: &[Row], machine: &str, quick: bool, took: Duration) {
    let mut table = String::new();
    let mode = if quick { "quick mode" } else { "full run" };
    let _ =
        writeln!(table, "taskexec benchmark ({mode}, {:.0} s) on {machine}\n", took.as_secs_f64());
    let _ = writeln!(table, "| scenario | measure | taskexec | reference | ratio | target | met |");
    let _ = writeln!(table, "|---|---|---|---|---|---|---|");
    for row in rows {
        let ratio = row.ratio.map(|r| format!("{r:.2}")).unwrap_or_default();
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.scenario, row.measure, row.value, row.reference, ratio, row.target, met
        );
    }
    println!("\n{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let json = serde_json::json!({
        "machine": machine,
        "quick": quick,
        "seconds": took.as_secs_f64(),
        "rows": rows,
    });
    let written = std::fs::write(dir.join("report.md"), &table).and_then(|()| {
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&json).unwrap())
    });
    match written {
        Ok(()) => println!("written to {}", dir.join("report.md").display()),
        Err(e) => eprintln!("could not write the report: {e}"),
    }
}

/// The p-th percentile (0..=100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank]
}
