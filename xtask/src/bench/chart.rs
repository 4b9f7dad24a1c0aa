//! `throughput.svg`: one group of horizontal bars per iperf3 case, one bar per tunnel, each
//! labelled with its median and its ratio to haproxy. The direct rate is written in the
//! group's label instead of drawn: it is several times the tunnels' and would squeeze their
//! bars, which are what the chart compares.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{Metric, Results};
use super::routes::RouteKind;

const WIDTH: i32 = 960;
const LABELS: i32 = 200;
const VALUES: i32 = 170;
const BAR: i32 = 20;
const BAR_GAP: i32 = 5;
const GROUP_GAP: i32 = 26;
const TOP: i32 = 140;
const AXIS: i32 = 50;

fn colour(route: RouteKind) -> RGBColor {
    match route {
        RouteKind::Userspace => RGBColor(31, 119, 180),
        RouteKind::Compare => RGBColor(174, 199, 232),
        RouteKind::Sockmap => RGBColor(23, 190, 207),
        RouteKind::Ktls => RGBColor(44, 160, 44),
        RouteKind::Haproxy => RGBColor(255, 127, 14),
        RouteKind::Stunnel => RGBColor(148, 103, 189),
        RouteKind::Direct => RGBColor(127, 127, 127),
    }
}

const GREY: RGBColor = RGBColor(90, 90, 90);
const GRID: RGBColor = RGBColor(225, 225, 225);

/// Font sizes are given in pixels; plotters' SVG backend divides what it is given by 1.24.
fn font(px: f64, style: FontStyle) -> FontDesc<'static> {
    ("sans-serif", px * 1.24, style).into_font()
}

pub fn throughput_svg(results: &Results, cases: &[Metric], subtitle: [&str; 2]) -> Result<String> {
    let tunnels: Vec<RouteKind> = results
        .routes
        .iter()
        .copied()
        .filter(|r| *r != RouteKind::Direct)
        .collect();
    let group_height = tunnels.len() as i32 * (BAR + BAR_GAP) - BAR_GAP;
    let height = TOP + cases.len() as i32 * (group_height + GROUP_GAP) + AXIS;
    let max = cases
        .iter()
        .flat_map(|m| tunnels.iter().filter_map(|r| results.median(*m, *r)))
        .fold(0.0_f64, f64::max);
    let (step, axis_max) = ticks(max);
    let plot_width = WIDTH - LABELS - VALUES;
    let x = |value: f64| LABELS + (value / axis_max * f64::from(plot_width)).round() as i32;

    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (WIDTH as u32, height as u32)).into_drawing_area();
        ok(root.fill(&WHITE))?;
        let left = |px, style| {
            font(px, style)
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center))
        };
        ok(root.draw(&Text::new(
            "iperf3 throughput between two network namespaces (Gbit/s, higher is better)",
            (20, 24),
            left(19.0, FontStyle::Bold),
        )))?;
        for (line, y) in subtitle.into_iter().zip([50, 70]) {
            ok(root.draw(&Text::new(
                line,
                (20, y),
                left(13.0, FontStyle::Normal).color(&GREY),
            )))?;
        }

        // Legend.
        let mut lx = 20;
        for route in &tunnels {
            let c = colour(*route);
            ok(root.draw(&Rectangle::new([(lx, 96), (lx + 14, 110)], c.filled())))?;
            ok(root.draw(&Text::new(
                route.label(),
                (lx + 20, 103),
                left(14.0, FontStyle::Normal),
            )))?;
            lx += 40 + 9 * route.label().len() as i32;
        }

        // Grid and axis.
        let bottom = height - AXIS + 6;
        let decimals = if step >= 1.0 {
            0
        } else {
            (-step.log10().floor()) as usize
        };
        for k in 0..=(axis_max / step).round() as i32 {
            let tick = f64::from(k) * step;
            let tx = x(tick);
            ok(root.draw(&PathElement::new(vec![(tx, TOP - 8), (tx, bottom)], GRID)))?;
            ok(root.draw(&Text::new(
                format!("{tick:.decimals$}"),
                (tx, bottom + 14),
                font(12.0, FontStyle::Normal)
                    .color(&GREY)
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            )))?;
        }
        ok(root.draw(&Text::new(
            "Gbit/s",
            (x(axis_max), bottom + 32),
            font(12.0, FontStyle::Normal)
                .color(&GREY)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        )))?;

        for (i, case) in cases.iter().enumerate() {
            let top = TOP + i as i32 * (group_height + GROUP_GAP);
            let mid = top + group_height / 2;
            let right = |px, style| {
                font(px, style)
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Right, VPos::Center))
            };
            let name = case.label().replacen("throughput, ", "", 1);
            ok(root.draw(&Text::new(
                name.clone(),
                (LABELS - 12, mid - 9),
                right(15.0, FontStyle::Bold),
            )))?;
            let direct = results
                .median(*case, RouteKind::Direct)
                .map_or("direct: not measured".to_owned(), |d| {
                    format!("direct: {d:.1} Gbit/s")
                });
            ok(root.draw(&Text::new(
                direct.clone(),
                (LABELS - 12, mid + 10),
                right(13.0, FontStyle::Normal).color(&GREY),
            )))?;
            for (j, route) in tunnels.iter().enumerate() {
                let y0 = top + j as i32 * (BAR + BAR_GAP);
                let label = match results.median(*case, *route) {
                    Some(value) => {
                        let c = colour(*route);
                        ok(root.draw(&Rectangle::new(
                            [(LABELS, y0), (x(value).max(LABELS + 1), y0 + BAR)],
                            c.filled(),
                        )))?;
                        match results.median(*case, RouteKind::Haproxy) {
                            Some(h) if *route != RouteKind::Haproxy && h > 0.0 => {
                                format!("{value:.2}  ({:.2}× haproxy)", value / h)
                            }
                            _ => format!("{value:.2}"),
                        }
                    }
                    None if results.failed(*case, *route) => "failed: see report.md".to_owned(),
                    None => "not measured".to_owned(),
                };
                let end = results.median(*case, *route).map_or(LABELS, x);
                ok(root.draw(&Text::new(
                    label.clone(),
                    (end + 6, y0 + BAR / 2),
                    left(13.0, FontStyle::Normal),
                )))?;
            }
        }
        ok(root.present())?;
    }
    Ok(svg)
}

fn ok<E: std::fmt::Debug>(result: std::result::Result<(), E>) -> Result<()> {
    result.map_err(|e| anyhow!("drawing the chart: {e:?}"))
}

/// A tick step of 1, 2 or 5 times a power of ten giving about five ticks, and the axis end.
fn ticks(max: f64) -> (f64, f64) {
    if max <= 0.0 {
        return (1.0, 1.0);
    }
    let raw = max / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    (step, (max / step).ceil() * step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(5.7), (2.0, 6.0));
        assert_eq!(ticks(12.0), (5.0, 15.0));
        assert_eq!(ticks(0.0), (1.0, 1.0));
        let (step, end) = ticks(0.37);
        assert!((step - 0.1).abs() < 1e-12 && (end - 0.4).abs() < 1e-9);
    }

    #[test]
    fn chart_labels_every_bar() {
        let mut results = Results::new(vec![
            RouteKind::Direct,
            RouteKind::Userspace,
            RouteKind::Sockmap,
            RouteKind::Haproxy,
            RouteKind::Stunnel,
        ]);
        let case = Metric::Throughput {
            streams: 1,
            reverse: false,
        };
        results.add(case, RouteKind::Direct, 28.94);
        results.add(case, RouteKind::Userspace, 6.0);
        results.add(case, RouteKind::Haproxy, 4.0);
        results.fail(case, RouteKind::Stunnel, "reset".into());
        let svg = throughput_svg(&results, &[case], ["median of 1", "commit x"]).unwrap();
        for text in [
            "1 stream, A→B",
            "direct: 28.9 Gbit/s",
            "6.00  (1.50× haproxy)",
            "\n4.00\n</text>",
            "clink userspace",
            "median of 1",
            "commit x",
            "failed: see report.md",
            "not measured",
        ] {
            assert!(svg.contains(text), "{text} missing from {svg}");
        }
    }
}
