//! The benchmark's report: one row per figure, broker and reference side by side with their
//! ratio, the target and whether it is met, and the placement and mode of every figure.

use std::fmt::Write;

use crate::bench::series::Series;

/// What a row must reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Informational: no target.
    None,
    /// broker median / reference median ≤ x.
    RatioAtMost(f64),
    /// broker median / reference median ≥ x.
    RatioAtLeast(f64),
    /// broker median ≤ x.
    AtMost(f64),
    /// broker median == x.
    Equal(f64),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::None => "-".into(),
            Target::RatioAtMost(x) => format!("ratio <= {x}"),
            Target::RatioAtLeast(x) => format!("ratio >= {x}"),
            Target::AtMost(x) => format!("<= {x}"),
            Target::Equal(x) => format!("= {x}"),
        }
    }
}

/// One figure.
#[derive(Debug, Clone)]
pub struct Row {
    /// What is measured, with its unit.
    pub case: String,
    /// Where both sides ran ("same core", "cross core", "unpinned").
    pub placement: String,
    /// Broker mode ("blocking", "busy-poll", ...).
    pub mode: String,
    /// The broker's figure over the runs.
    pub ours: Series,
    /// The reference's figure over the same runs, when there is one.
    pub reference: Option<Series>,
    /// Target.
    pub target: Target,
    /// Decimals to print.
    pub prec: usize,
}

impl Row {
    /// A row without a reference.
    pub fn new(case: &str, placement: &str, mode: &str, target: Target, prec: usize) -> Row {
        Row {
            case: case.into(),
            placement: placement.into(),
            mode: mode.into(),
            ours: Series::default(),
            reference: None,
            target,
            prec,
        }
    }

    /// A row with a reference figure.
    pub fn with_reference(mut self) -> Row {
        self.reference = Some(Series::default());
        self
    }

    /// Median ratio broker / reference.
    pub fn ratio(&self) -> Option<f64> {
        let r = self.reference.as_ref()?;
        (!r.is_empty() && !self.ours.is_empty()).then(|| self.ours.median() / r.median())
    }

    /// Whether the target is met (None when there is no target or no figure).
    pub fn met(&self) -> Option<bool> {
        if self.ours.is_empty() {
            return None;
        }
        let m = self.ours.median();
        match self.target {
            Target::None => None,
            Target::RatioAtMost(x) => self.ratio().map(|r| r <= x),
            Target::RatioAtLeast(x) => self.ratio().map(|r| r >= x),
            Target::AtMost(x) => Some(m <= x),
            Target::Equal(x) => Some(m == x),
        }
    }
}

/// Render rows as an aligned text table (also valid Markdown).
pub fn render(rows: &[Row]) -> String {
    let head = [
        "case",
        "placement",
        "mode",
        "broker median [min-max]",
        "reference median [min-max]",
        "ratio",
        "target",
        "met",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.case.clone(),
                r.placement.clone(),
                r.mode.clone(),
                r.ours.summary(r.prec),
                r.reference.as_ref().map_or("-".into(), |s| s.summary(r.prec)),
                r.ratio().map_or("-".into(), |x| format!("{x:.2}")),
                r.target.describe(),
                match r.met() {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let mut w = [0usize; 8];
    for (i, h) in head.iter().enumerate() {
        w[i] = h.len();
    }
    for c in &cells {
        for i in 0..8 {
            w[i] = w[i].max(c[i].chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: &[String]| {
        out.push('|');
        for i in 0..8 {
            let _ = write!(out, " {:<width$} |", c[i], width = w[i]);
        }
        out.push('\n');
    };
    line(&mut out, &head.map(String::from));
    out.push('|');
    for width in w {
        let _ = write!(out, "{}|", "-".repeat(width + 2));
    }
    out.push('\n');
    for c in &cells {
        line(&mut out, c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_and_targets() {
        let mut r = Row::new("x", "same core", "blocking", Target::RatioAtMost(1.25), 2).with_reference();
        assert_eq!(r.met(), None);
        r.ours.push(10.0);
        r.reference.as_mut().unwrap().push(9.0);
        assert!((r.ratio().unwrap() - 10.0 / 9.0).abs() < 1e-9);
        assert_eq!(r.met(), Some(true));
        let mut z = Row::new("wakes", "-", "-", Target::Equal(0.0), 0);
        z.ours.push(0.0);
        assert_eq!(z.met(), Some(true));
        let t = render(&[r, z]);
        assert!(t.contains("| yes |") && t.contains("10.00 [10.00-10.00]"), "{t}");
    }
}
