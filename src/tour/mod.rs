//! `rnnc tour`: the chapter's claims, each measured on this compiler.
//!
//! One experiment per section of the chapter (see [`Section`]), each on data it makes or ships,
//! each naming the backend it ran on. Every experiment ends in a [`Finding`]: the chapter's
//! claim, what was measured, whether the claim holds here, and where it does not, why. The
//! tour writes a report folder (`report.md`, one PNG plot or more per section, and
//! `summary.json` with every section's numbers) and returns the findings for a summary on the
//! terminal.
//!
//! Nothing is hard-coded: every number comes from a run seeded by [`Options::seed`] (weights,
//! data, batches), so another seed gives other numbers. [`Options::quick`] shrinks every
//! budget to seconds, for CI; its verdicts are then made on too little training to mean much,
//! and the report says so.

pub mod plot;
mod sections;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A section of the chapter, as the tour measures it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Section {
    /// §2: the vanilla cell stepped over five tokens; the parameter table.
    Cell,
    /// §3: vanishing and exploding gradients through 100 steps.
    Gradients,
    /// §4: the RNN / LSTM / GRU property table, measured.
    Properties,
    /// §5: bidirectional RNNs on a task that needs right context.
    Bidirectional,
    /// §6 and §8: the encoder-decoder, greedy decoding, and the bottleneck.
    Seq2seq,
    /// §7: the cost of sequential computation.
    Sequential,
    /// The packing tip: packed against padded batches.
    Packing,
    /// Karpathy's character model on Shakespeare.
    Charlm,
}

impl Section {
    /// Every section, in the chapter's order.
    pub const ALL: [Section; 8] = [
        Section::Cell,
        Section::Gradients,
        Section::Properties,
        Section::Bidirectional,
        Section::Seq2seq,
        Section::Sequential,
        Section::Packing,
        Section::Charlm,
    ];

    /// The name `--only` takes (and the report's anchor).
    pub fn name(self) -> &'static str {
        match self {
            Section::Cell => "cell",
            Section::Gradients => "gradients",
            Section::Properties => "properties",
            Section::Bidirectional => "bidirectional",
            Section::Seq2seq => "seq2seq",
            Section::Sequential => "sequential",
            Section::Packing => "packing",
            Section::Charlm => "charlm",
        }
    }

    /// The chapter's section number(s), or the name of the box it comes from.
    pub fn place(self) -> &'static str {
        match self {
            Section::Cell => "§2",
            Section::Gradients => "§3",
            Section::Properties => "§4",
            Section::Bidirectional => "§5",
            Section::Seq2seq => "§6, §8",
            Section::Sequential => "§7",
            Section::Packing => "tip",
            Section::Charlm => "char-rnn",
        }
    }

    /// A heading.
    pub fn title(self) -> &'static str {
        match self {
            Section::Cell => "The vanilla RNN cell",
            Section::Gradients => "Vanishing and exploding gradients",
            Section::Properties => "The property table, measured",
            Section::Bidirectional => "Bidirectional RNNs",
            Section::Seq2seq => "The encoder-decoder and its bottleneck",
            Section::Sequential => "The cost of sequential computation",
            Section::Packing => "Packing variable-length batches",
            Section::Charlm => "A character language model on Shakespeare",
        }
    }
}

impl std::str::FromStr for Section {
    type Err = String;

    /// A section by name (`cell`, `gradients`, ...) or by the chapter's number (`2`, `§3`,
    /// `6` and `8` both being the encoder-decoder), case-insensitively.
    fn from_str(s: &str) -> Result<Section, String> {
        let key = s.trim().trim_start_matches('§').to_ascii_lowercase();
        let by_number = match key.as_str() {
            "2" => Some(Section::Cell),
            "3" => Some(Section::Gradients),
            "4" => Some(Section::Properties),
            "5" => Some(Section::Bidirectional),
            "6" | "8" => Some(Section::Seq2seq),
            "7" => Some(Section::Sequential),
            "tip" | "pack" => Some(Section::Packing),
            "char" | "karpathy" => Some(Section::Charlm),
            _ => None,
        };
        by_number
            .or_else(|| Section::ALL.into_iter().find(|x| x.name() == key))
            .ok_or_else(|| {
                let names: Vec<&str> = Section::ALL.iter().map(|x| x.name()).collect();
                format!(
                    "unknown section `{s}`: expected one of {} (or the chapter's number, 2 to 8)",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the chapter's claim holds on this machine and compiler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The measurement agrees with the claim.
    Holds,
    /// The phenomenon is there, but not as the chapter states it (its size, or part of it).
    Partly,
    /// The measurement disagrees with the claim.
    Differs,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Holds => "holds",
            Verdict::Partly => "partly",
            Verdict::Differs => "differs",
        })
    }
}

/// What one section measured.
#[derive(Clone, Debug)]
pub struct Finding {
    /// The section.
    pub section: Section,
    /// The backend(s) it ran on, named.
    pub backend: String,
    /// The chapter's claim, in a sentence.
    pub claim: String,
    /// What was measured, in a sentence.
    pub measured: String,
    /// Whether the claim holds.
    pub verdict: Verdict,
    /// Why it holds, or where and why it differs.
    pub why: String,
    /// Markdown: the tables and samples of the section.
    pub body: String,
    /// The section's key numbers, by name (in `summary.json`).
    pub numbers: Vec<(String, f64)>,
    /// The PNG files it wrote, in the report folder.
    pub plots: Vec<String>,
    /// How long it took, in seconds.
    pub seconds: f64,
}

/// How the tour runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seconds instead of minutes: every budget shrunk (for CI).
    pub quick: bool,
    /// The seed of every weight, datum and batch.
    pub seed: u64,
    /// The report folder.
    pub out: PathBuf,
    /// The sections to run; all when empty.
    pub only: Vec<Section>,
    /// Progress bars on standard error (drawn only on a terminal).
    pub progress: bool,
}

/// A failure of the tour: a model error, or the report folder.
#[derive(Debug)]
pub enum TourError {
    /// A model, weight or run error of the compiler, in a section.
    Model(Section, crate::Error),
    /// The report folder or a file in it.
    Out(PathBuf, String),
}

impl fmt::Display for TourError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TourError::Model(s, e) => write!(f, "section {s}: {e}"),
            TourError::Out(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

impl std::error::Error for TourError {}

/// The marker file of a report folder the tour wrote: only such a folder (or a new or empty
/// one) is written into, so nothing the user keeps there is overwritten.
pub const MARKER: &str = ".rnn-tour";

/// Every plot the tour draws, by file name: what a new tour replaces in a folder an earlier
/// one wrote (and nothing else there).
pub const PLOTS: [&str; 8] = [
    "cell_state_norms.png",
    "gradients.png",
    "properties_recall.png",
    "bidirectional.png",
    "seq2seq_bottleneck.png",
    "sequential.png",
    "packing.png",
    "charlm_loss.png",
];

/// The files besides the plots that the tour writes.
const FILES: [&str; 2] = ["report.md", "summary.json"];

/// Prepares the report folder: creates it, or accepts an empty one or one the tour wrote
/// before (whose report, plots and summary are then replaced; nothing else there is touched).
fn prepare(out: &Path) -> Result<(), TourError> {
    let fail = |e: &dyn fmt::Display| TourError::Out(out.to_path_buf(), e.to_string());
    if out.as_os_str().is_empty() {
        return Err(fail(&"the report folder's path is empty"));
    }
    // A symbolic link where a file of the report goes would write elsewhere.
    for name in PLOTS.iter().chain(&FILES).chain(&[MARKER]) {
        let p = out.join(name);
        if p.symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(TourError::Out(
                p,
                "is a symbolic link: the tour writes only files of its own; remove it or choose another `--out`".into(),
            ));
        }
    }
    if out.exists() {
        if !out.is_dir() {
            return Err(fail(&"exists and is not a folder: choose another `--out`"));
        }
        let marked = out.join(MARKER).exists();
        let empty = std::fs::read_dir(out)
            .map_err(|e| fail(&e))?
            .next()
            .is_none();
        if !marked && !empty {
            return Err(fail(
                &"exists, holds files and was not written by the tour: nothing there is overwritten; choose another `--out`",
            ));
        }
        if marked {
            // The previous tour's plots go, so that none is left over from a section not
            // run this time; any other file stays.
            for name in PLOTS {
                let p = out.join(name);
                if p.is_file() {
                    std::fs::remove_file(&p).map_err(|e| fail(&e))?;
                }
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| fail(&e))?;
    std::fs::write(
        out.join(MARKER),
        "written by `rnnc tour`: the tour replaces its report here\n",
    )
    .map_err(|e| fail(&e))
}

/// Runs the tour: each section in turn, `done` called after each; then writes `report.md`
/// and `summary.json` into [`Options::out`].
pub fn run(opts: &Options, mut done: impl FnMut(&Finding)) -> Result<Vec<Finding>, TourError> {
    prepare(&opts.out)?;
    let clock = Instant::now();
    let ctx = sections::Ctx {
        quick: opts.quick,
        seed: opts.seed,
        out: opts.out.clone(),
        progress: opts.progress,
    };
    let mut findings = Vec::new();
    for section in Section::ALL {
        if !opts.only.is_empty() && !opts.only.contains(&section) {
            continue;
        }
        let start = Instant::now();
        let mut f = sections::run(&ctx, section).map_err(|e| match e {
            sections::Failure::Model(e) => TourError::Model(section, e),
            sections::Failure::Out(p, e) => TourError::Out(p, e),
        })?;
        f.seconds = start.elapsed().as_secs_f64();
        debug_assert!(
            f.plots.iter().all(|p| PLOTS.contains(&p.as_str())),
            "every plot is listed in PLOTS"
        );
        done(&f);
        findings.push(f);
    }
    let total = clock.elapsed().as_secs_f64();
    let write = |name: &str, text: String| {
        let p = opts.out.join(name);
        std::fs::write(&p, text).map_err(|e| TourError::Out(p.clone(), e.to_string()))
    };
    write("report.md", report(opts, &findings, total))?;
    write("summary.json", summary_json(opts, &findings, total))?;
    Ok(findings)
}

/// The machine, for the report: the CPU's model name and the number of cores.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores")
}

/// Today's date (UTC) from the system clock, as `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Howard Hinnant's civil-from-days.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The summary table, as printed on the terminal.
pub fn summary_table(findings: &[Finding]) -> String {
    let mut rows = vec![[
        "section".to_string(),
        "backend".to_string(),
        "measured".to_string(),
        "claim".to_string(),
    ]];
    for f in findings {
        rows.push([
            format!("{} {}", f.section.place(), f.section.name()),
            f.backend.clone(),
            f.measured.clone(),
            f.verdict.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for (i, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(cells.join("  ").trim_end());
        s.push('\n');
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            s.push_str(&rule.join("  "));
            s.push('\n');
        }
    }
    s
}

fn report(opts: &Options, findings: &[Finding], total: f64) -> String {
    let mut s = String::new();
    s.push_str("# The chapter, measured\n\n");
    s.push_str(&format!(
        "`rnnc tour{}` with seed {}, on {} ({}), {:.0} s in all. Every number below was measured \
         in this run; the chapter's printed outputs are illustrative, and where they disagree \
         with a measurement the section says so and why.\n\n",
        if opts.quick { " --quick" } else { "" },
        opts.seed,
        machine(),
        today(),
        total
    ));
    if opts.quick {
        s.push_str(
            "**Quick run**: every budget was cut to seconds. The trainings are far too short to \
             judge the claims about learning; run `rnnc tour` for the real measurement.\n\n",
        );
    }
    s.push_str("| section | backend | measured | the chapter's claim |\n|---|---|---|---|\n");
    for f in findings {
        s.push_str(&format!(
            "| [{} {}](#{}) | {} | {} | {} |\n",
            f.section.place(),
            f.section.title(),
            f.section.name(),
            f.backend,
            f.measured,
            f.verdict
        ));
    }
    for f in findings {
        s.push_str(&format!(
            "\n<a id=\"{}\"></a>\n## {} {}\n\n",
            f.section.name(),
            f.section.place(),
            f.section.title()
        ));
        s.push_str(&format!("**The chapter:** {}\n\n", f.claim));
        s.push_str(&format!(
            "**Measured** (on {}): {}\n\n",
            f.backend, f.measured
        ));
        s.push_str(&format!("**The claim {}.** {}\n\n", f.verdict, f.why));
        s.push_str(&f.body);
        if !f.body.ends_with('\n') {
            s.push('\n');
        }
        for p in &f.plots {
            s.push_str(&format!("\n![{p}]({p})\n"));
        }
        s.push_str(&format!("\n_{:.1} s._\n", f.seconds));
    }
    s
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A JSON number (`null` for what JSON cannot hold).
fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn summary_json(opts: &Options, findings: &[Finding], total: f64) -> String {
    let sections: Vec<String> = findings
        .iter()
        .map(|f| {
            let numbers: Vec<String> = f
                .numbers
                .iter()
                .map(|(k, v)| format!("{}: {}", json_str(k), json_num(*v)))
                .collect();
            let plots: Vec<String> = f.plots.iter().map(|p| json_str(p)).collect();
            format!(
                "    {{\"section\": {}, \"backend\": {}, \"verdict\": {}, \"measured\": {}, \"seconds\": {}, \"plots\": [{}], \"numbers\": {{{}}}}}",
                json_str(f.section.name()),
                json_str(&f.backend),
                json_str(&f.verdict.to_string()),
                json_str(&f.measured),
                json_num(f.seconds),
                plots.join(", "),
                numbers.join(", ")
            )
        })
        .collect();
    format!(
        "{{\n  \"seed\": {},\n  \"quick\": {},\n  \"seconds\": {},\n  \"machine\": {},\n  \"date\": {},\n  \"sections\": [\n{}\n  ]\n}}\n",
        opts.seed,
        opts.quick,
        json_num(total),
        json_str(&machine()),
        json_str(&today()),
        sections.join(",\n")
    )
}
