//! Load traces for the simulator: CSV (`time,rps,cpu,…`) or JSON (`[{"time": 0, "rps": 10}, …]`).
//!
//! `time` is in seconds from the start. Every other column is a metric name (see
//! [`Metric::parse`]); a value holds until the next point. An empty cell means no sample, and
//! `fail` marks a failed read of the source.

use crate::engine::Sample;
use crate::metric::Metric;
use crate::time::Timestamp;

/// Why a trace was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TraceError {
    /// Malformed CSV.
    #[error("line {line}: {message}")]
    Csv {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Malformed JSON.
    #[error("json: {0}")]
    Json(String),
    /// No points.
    #[error("the trace has no points")]
    Empty,
}

/// One point of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TracePoint {
    /// When.
    pub time: Timestamp,
    /// Samples taking effect at that time.
    pub samples: Vec<(Metric, Sample)>,
}

/// A whole trace, sorted by time.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Trace {
    /// The points.
    pub points: Vec<TracePoint>,
}

fn secs(v: f64) -> Option<Timestamp> {
    (v.is_finite() && v >= 0.0).then(|| Timestamp::from_millis((v * 1000.0).round() as u64))
}

impl Trace {
    /// Parses CSV or JSON, guessing from the first non-blank character.
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        match text.trim_start().chars().next() {
            Some('[') | Some('{') => Self::from_json(text),
            _ => Self::from_csv(text),
        }
    }

    /// Parses CSV with a header line; `#` lines are comments.
    pub fn from_csv(text: &str) -> Result<Trace, TraceError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        let (hline, header) = lines.next().ok_or(TraceError::Empty)?;
        let err = |line: usize, message: String| TraceError::Csv {
            line: line + 1,
            message,
        };
        let cols: Vec<&str> = header.split(',').map(str::trim).collect();
        if cols.first() != Some(&"time") {
            return Err(err(hline, "the first column must be `time`".into()));
        }
        let metrics = cols[1..]
            .iter()
            .map(|c| Metric::parse(c).ok_or_else(|| err(hline, format!("unknown metric column {c:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut points = Vec::new();
        for (i, line) in lines {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            let time = cells[0]
                .parse::<f64>()
                .ok()
                .and_then(secs)
                .ok_or_else(|| err(i, format!("bad time {:?}", cells[0])))?;
            let mut samples = Vec::new();
            for (m, cell) in metrics.iter().zip(cells.iter().skip(1)) {
                match *cell {
                    "" => {}
                    "fail" | "error" => samples.push((m.clone(), Sample::Failed)),
                    v => match v.parse::<f64>() {
                        Ok(x) if x.is_finite() => samples.push((m.clone(), Sample::Value(x))),
                        _ => return Err(err(i, format!("bad value {v:?} for {m}"))),
                    },
                }
            }
            points.push(TracePoint { time, samples });
        }
        Self::finish(points)
    }

    /// Parses `[{"time": 0, "rps": 10, "external:q": "fail"}, …]` or `{"points": […]}`.
    pub fn from_json(text: &str) -> Result<Trace, TraceError> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| TraceError::Json(e.to_string()))?;
        let arr = match &v {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(o) => o
                .get("points")
                .and_then(|p| p.as_array())
                .ok_or_else(|| TraceError::Json("expected an array or {\"points\": [...]}".into()))?,
            _ => return Err(TraceError::Json("expected an array".into())),
        };
        let mut points = Vec::new();
        for (i, p) in arr.iter().enumerate() {
            let obj = p
                .as_object()
                .ok_or_else(|| TraceError::Json(format!("point {i} is not an object")))?;
            let time = obj
                .get("time")
                .and_then(serde_json::Value::as_f64)
                .and_then(secs)
                .ok_or_else(|| TraceError::Json(format!("point {i}: missing or bad `time`")))?;
            let mut samples = Vec::new();
            for (k, val) in obj.iter().filter(|(k, _)| k.as_str() != "time") {
                let m = Metric::parse(k)
                    .ok_or_else(|| TraceError::Json(format!("point {i}: unknown metric {k:?}")))?;
                let s = match val {
                    serde_json::Value::String(s) if s == "fail" || s == "error" => Sample::Failed,
                    serde_json::Value::Null => continue,
                    other => Sample::Value(
                        other
                            .as_f64()
                            .ok_or_else(|| TraceError::Json(format!("point {i}: bad value for {k}")))?,
                    ),
                };
                samples.push((m, s));
            }
            points.push(TracePoint { time, samples });
        }
        Self::finish(points)
    }

    fn finish(mut points: Vec<TracePoint>) -> Result<Trace, TraceError> {
        if points.is_empty() {
            return Err(TraceError::Empty);
        }
        points.sort_by_key(|p| p.time);
        Ok(Trace { points })
    }

    /// Time of the last point.
    pub fn end(&self) -> Timestamp {
        self.points.last().map_or(Timestamp::ZERO, |p| p.time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_json() {
        let t = Trace::parse("# demo\ntime,rps,external:q\n0,10,\n5.5,20,fail\n").expect("valid");
        assert_eq!(t.points.len(), 2);
        assert_eq!(t.points[1].time, Timestamp::from_millis(5500));
        assert_eq!(
            t.points[1].samples[1],
            (Metric::External("q".into()), Sample::Failed)
        );
        let j = Trace::parse(r#"[{"time": 3, "rps": 7}, {"time": 1, "cpu": 50}]"#).expect("valid");
        assert_eq!(j.points[0].time, Timestamp::from_secs(1));
        assert_eq!(j.end(), Timestamp::from_secs(3));
        assert_eq!(
            Trace::parse("time,rps\n1,abc\n"),
            Err(TraceError::Csv {
                line: 2,
                message: "bad value \"abc\" for rps".into()
            })
        );
        assert!(matches!(
            Trace::parse("time,qps\n"),
            Err(TraceError::Csv { line: 1, .. })
        ));
    }
}
