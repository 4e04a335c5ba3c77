//! The vitals chart: blood pressure, pulse, weight, pain and glucose over time, drawn as inline
//! SVG on the server (no script, nothing for the CSP to allow), one small panel per measure,
//! each with a title and a description for screen readers and the readings as a table beside.

use fieldchart_core::model::{VitalReading, VitalType};
use maud::{Markup, html};

use crate::clock::format_ms;

/// Panel size, in SVG user units.
const WIDTH: f64 = 320.0;
const HEIGHT: f64 = 120.0;
const PAD_LEFT: f64 = 40.0;
const PAD_RIGHT: f64 = 10.0;
const PAD_Y: f64 = 14.0;

/// One measure's series: `(time ms, values…)` (two values for blood pressure).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Heading.
    pub label: &'static str,
    /// Unit shown on the axis.
    pub unit: String,
    /// Points by time.
    pub points: Vec<(i64, Vec<f64>)>,
}

/// The measures the chart shows, in order.
const MEASURES: &[(VitalType, &str)] = &[
    (VitalType::BloodPressure, "Blood pressure"),
    (VitalType::Pulse, "Pulse"),
    (VitalType::Weight, "Weight"),
    (VitalType::Pain, "Pain"),
    (VitalType::Glucose, "Glucose"),
];

/// Parse a reading's value: `120/80` for blood pressure, a number otherwise. Unreadable
/// values are left out of the chart (they stay in the note, as recorded).
fn parse_value(vital: VitalType, value: &str) -> Option<Vec<f64>> {
    let number = |s: &str| s.trim().parse::<f64>().ok().filter(|v| v.is_finite());
    if vital == VitalType::BloodPressure {
        let (sys, dia) = value.split_once('/')?;
        Some(vec![number(sys)?, number(dia)?])
    } else {
        Some(vec![number(value)?])
    }
}

/// The series of each measure that has readings.
pub fn series(readings: &[VitalReading]) -> Vec<Series> {
    MEASURES
        .iter()
        .filter_map(|(vital, label)| {
            let mut points: Vec<(i64, Vec<f64>)> = readings
                .iter()
                .filter(|r| r.vital == *vital)
                .filter_map(|r| Some((r.taken_at_ms, parse_value(*vital, &r.value)?)))
                .collect();
            if points.is_empty() {
                return None;
            }
            points.sort_by_key(|(t, _)| *t);
            let unit = readings
                .iter()
                .find(|r| r.vital == *vital)
                .map(|r| r.unit.clone())
                .unwrap_or_default();
            Some(Series {
                label,
                unit,
                points,
            })
        })
        .collect()
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// One panel as SVG.
pub fn panel(s: &Series) -> Markup {
    let (t0, t1) = (
        s.points.first().map_or(0, |p| p.0),
        s.points.last().map_or(0, |p| p.0),
    );
    let values = s.points.iter().flat_map(|(_, v)| v.iter().copied());
    let (mut lo, mut hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if (hi - lo).abs() < f64::EPSILON {
        lo -= 1.0;
        hi += 1.0;
    }
    let x = |t: i64| {
        if t1 == t0 {
            PAD_LEFT + (WIDTH - PAD_LEFT - PAD_RIGHT) / 2.0
        } else {
            PAD_LEFT + (t - t0) as f64 / (t1 - t0) as f64 * (WIDTH - PAD_LEFT - PAD_RIGHT)
        }
    };
    let y = |v: f64| HEIGHT - PAD_Y - (v - lo) / (hi - lo) * (HEIGHT - 2.0 * PAD_Y);
    let lines = s.points.first().map_or(0, |p| p.1.len());
    let id = s.label.to_lowercase().replace(' ', "-");
    let description = format!(
        "{} readings from {} to {}, between {} and {} {}",
        s.points.len(),
        format_ms(t0),
        format_ms(t1),
        fmt_num(lo),
        fmt_num(hi),
        s.unit
    );
    html! {
        svg class="vitals-panel" viewBox={"0 0 " (WIDTH) " " (HEIGHT)} role="img"
            aria-labelledby={"vt-" (id) " vd-" (id)} {
            title id={"vt-" (id)} { (s.label) }
            desc id={"vd-" (id)} { (description) }
            line class="axis" x1=(PAD_LEFT) y1=(PAD_Y) x2=(PAD_LEFT) y2=(HEIGHT - PAD_Y) {}
            line class="axis" x1=(PAD_LEFT) y1=(HEIGHT - PAD_Y) x2=(WIDTH - PAD_RIGHT) y2=(HEIGHT - PAD_Y) {}
            text class="tick" x=(PAD_LEFT - 4.0) y=(y(hi) + 4.0) text-anchor="end" { (fmt_num(hi)) }
            text class="tick" x=(PAD_LEFT - 4.0) y=(y(lo) + 4.0) text-anchor="end" { (fmt_num(lo)) }
            @for line in 0..lines {
                @let points: String = s.points.iter()
                    .filter_map(|(t, v)| v.get(line).map(|v| format!("{:.1},{:.1} ", x(*t), y(*v))))
                    .collect();
                polyline class={"series s" (line)} points=(points) {}
                @for (t, v) in &s.points {
                    @if let Some(v) = v.get(line) {
                        circle class={"point s" (line)} cx=(format!("{:.1}", x(*t))) cy=(format!("{:.1}", y(*v))) r="3" {
                            title { (format_ms(*t)) ": " (fmt_num(*v)) " " (s.unit) }
                        }
                    }
                }
            }
        }
    }
}

/// The whole chart: a panel per measure with readings, or a sentence saying there are none.
pub fn chart(readings: &[VitalReading]) -> Markup {
    let all = series(readings);
    html! {
        @if all.is_empty() {
            p { "No vital signs recorded yet." }
        } @else {
            div class="vitals" {
                @for s in &all {
                    figure {
                        figcaption { (s.label) @if !s.unit.is_empty() { " (" (s.unit) ")" } }
                        (panel(s))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(vital: VitalType, value: &str, at: i64) -> VitalReading {
        VitalReading {
            id: format!("r{at}"),
            vital,
            value: value.into(),
            unit: "u".into(),
            taken_at_ms: at,
            recorded_by: "n".into(),
            supersedes: None,
        }
    }

    #[test]
    fn blood_pressure_has_two_lines_and_bad_values_are_left_out() {
        let readings = vec![
            reading(VitalType::BloodPressure, "120/80", 2),
            reading(VitalType::BloodPressure, "130/85", 1),
            reading(VitalType::BloodPressure, "high", 3),
            reading(VitalType::Pulse, "72", 1),
        ];
        let s = series(&readings);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label, "Blood pressure");
        assert_eq!(
            s[0].points,
            vec![(1, vec![130.0, 85.0]), (2, vec![120.0, 80.0])]
        );
        let svg = panel(&s[0]).into_string();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        // A single reading still draws (a flat range is widened, not divided by zero).
        let svg = panel(&s[1]).into_string();
        assert!(svg.contains("<circle") && !svg.contains("NaN"), "{svg}");
    }
}
