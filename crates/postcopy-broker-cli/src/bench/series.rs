//! Figures collected over several runs, summarised as median and min-max.

/// One figure over several runs.
#[derive(Debug, Clone, Default)]
pub struct Series(Vec<f64>);

impl Series {
    /// Add one run's value.
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no run was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values in run order.
    pub fn values(&self) -> &[f64] {
        &self.0
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_unstable_by(f64::total_cmp);
        v
    }

    /// The median (mean of the two middle values for an even count); NaN when empty.
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// The smallest value; NaN when empty.
    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    /// The largest value; NaN when empty.
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// `median [min-max]` with `prec` decimals.
    pub fn summary(&self, prec: usize) -> String {
        if self.is_empty() {
            return "-".into();
        }
        format!("{:.p$} [{:.p$}-{:.p$}]", self.median(), self.min(), self.max(), p = prec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let mut s = Series::default();
        assert!(s.median().is_nan());
        for v in [3.0, 1.0, 2.0] {
            s.push(v);
        }
        assert_eq!((s.median(), s.min(), s.max()), (2.0, 1.0, 3.0));
        s.push(10.0);
        assert_eq!(s.median(), 2.5);
        assert_eq!(s.summary(1), "2.5 [1.0-10.0]");
    }
}
