//! Line charts as PNG and SVG with plotters, using an embedded DejaVu Sans
//! (plotters' `ab_glyph` backend), so plots build and render on a machine
//! without system font packages.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, anyhow};
use plotters::coord::types::RangedCoordf64;
use plotters::element::{DashedPathElement, MultiLineText};
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// A line chart's legend: label size, and the room left for each series'
/// mark and around the labels (set on plotters, and used to size the box
/// when choosing where it goes).
const LEGEND_FONT: u32 = 14;
const LEGEND_MARK: u32 = 30;
const LEGEND_MARGIN: u32 = 10;
static REGISTER: Once = Once::new();

fn register() {
    REGISTER.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            let _ = plotters::style::register_font("sans-serif", style, FONT);
        }
    });
}

/// One named curve.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// `(x, y)` points (non-finite ones are dropped).
    pub points: Vec<(f64, f64)>,
    /// Draw dots instead of a line.
    pub dots: bool,
    /// Palette index (default: the series' position).
    pub color: Option<usize>,
    /// Draw a dashed line (a second kind of series in one colour).
    pub dashed: bool,
}

impl Series {
    /// A line.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            dots: false,
            color: None,
            dashed: false,
        }
    }
    /// Dots.
    pub fn dots(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            dots: true,
            color: None,
            dashed: false,
        }
    }
    /// The same series in palette colour `i`.
    pub fn colored(mut self, i: usize) -> Self {
        self.color = Some(i);
        self
    }
    /// The same line, dashed (told apart from a solid line of its colour).
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    xl: &str,
    yl: &str,
    series: &[Series],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = pts.iter().fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = |lo: f64, hi: f64| {
        let span = if hi > lo { hi - lo } else { 1.0 };
        (lo - 0.05 * span, hi + 0.05 * span)
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc(xl)
        .y_desc(yl)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(s.color.unwrap_or(i)).to_rgba();
        let p: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let style = color.stroke_width(2);
        let anno = if s.dots {
            chart.draw_series(p.iter().map(|&xy| Circle::new(xy, 2, color.filled())))
        } else if s.dashed {
            chart.draw_series(DashedLineSeries::new(p, 8, 5, style))
        } else {
            chart.draw_series(LineSeries::new(p, style))
        }
        .map_err(|e| anyhow!("{e:?}"))?;
        // A series without a name draws no legend entry (markers over a named line).
        if s.name.is_empty() {
            continue;
        }
        let anno = anno.label(&s.name);
        if s.dots {
            anno.legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
        } else if s.dashed {
            anno.legend(move |(x, y)| {
                DashedPathElement::new(vec![(x, y), (x + 20, y)], 6, 3, style)
            });
        } else {
            anno.legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    let position = legend_position(&chart, series)?;
    chart
        .configure_series_labels()
        .position(position)
        .legend_area_size(LEGEND_MARK)
        .margin(LEGEND_MARGIN)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", LEGEND_FONT))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// Where the legend hides the fewest data: of plotters' nine places in the
/// plotting area, the one whose box (sized as plotters sizes it, with the
/// `LEGEND_*` sizes `draw` sets) covers the fewest of the series' points and of the
/// points along their lines (each segment sampled every 4 pixels); a tie
/// goes to the earlier place in `places`, plotters' default first.
fn legend_position<DB: DrawingBackend>(
    chart: &ChartContext<DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    series: &[Series],
) -> anyhow::Result<SeriesLabelPosition> {
    use SeriesLabelPosition::*;
    let font: TextStyle = ("sans-serif", LEGEND_FONT).into_font().into();
    let mut text = MultiLineText::<_, &str>::new((0, 0), &font);
    for s in series.iter().filter(|s| !s.name.is_empty()) {
        text.push_line(s.name.as_str());
    }
    let (w, h) = text
        .estimate_dimension()
        .map_err(|e| anyhow!("legend size: {e:?}"))?;
    let (mark, margin) = (LEGEND_MARK as i32, LEGEND_MARGIN as i32);
    let (w, h) = (w + mark + 2 * margin, h + 2 * margin);
    let area = chart.plotting_area();
    let (area_w, area_h) = area.dim_in_pixel();
    let (bx, by) = area.get_base_pixel();
    let mut pixels: Vec<(i32, i32)> = Vec::new();
    for s in series {
        let p: Vec<(i32, i32)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|xy| {
                let (x, y) = chart.backend_coord(xy);
                (x - bx, y - by)
            })
            .collect();
        pixels.extend(&p);
        if !s.dots {
            for pair in p.windows(2) {
                let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
                let steps = ((x1 - x0).abs().max((y1 - y0).abs()) / 4).max(1);
                pixels.extend(
                    (1..steps).map(|k| (x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps)),
                );
            }
        }
    }
    // The places as plotters lays them out (`layout_label_area`).
    let (aw, ah) = (area_w as i32, area_h as i32);
    let place = |p: &SeriesLabelPosition| {
        let x = match p {
            UpperLeft | MiddleLeft | LowerLeft => 5,
            UpperMiddle | MiddleMiddle | LowerMiddle => (aw - w) / 2,
            _ => aw - w - 5,
        };
        let y = match p {
            UpperLeft | UpperMiddle | UpperRight => 5,
            MiddleLeft | MiddleMiddle | MiddleRight => (ah - h) / 2,
            _ => ah - h - 5,
        };
        (x, y)
    };
    let hidden = |p: &SeriesLabelPosition| {
        let (x, y) = place(p);
        // A dot's radius of slack.
        pixels
            .iter()
            .filter(|&&(px, py)| px >= x - 3 && px <= x + w + 3 && py >= y - 3 && py <= y + h + 3)
            .count()
    };
    let places = [
        MiddleRight,
        UpperRight,
        LowerRight,
        UpperLeft,
        LowerLeft,
        MiddleLeft,
        UpperMiddle,
        LowerMiddle,
        MiddleMiddle,
    ];
    let best = places
        .iter()
        .min_by_key(|p| hidden(p))
        .expect("nine places");
    Ok(best.clone())
}

/// Renders one figure as `<stem>.png` and `<stem>.svg`: each is drawn under a
/// temporary name and renamed into place, so a reader never sees half a plot.
fn render(
    stem: &Path,
    size: (u32, u32),
    png: impl FnOnce(DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()>,
    svg: impl FnOnce(DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    register();
    let tmp_png = stem.with_extension("tmp.png");
    let tmp_svg = stem.with_extension("tmp.svg");
    png(BitMapBackend::new(&tmp_png, size).into_drawing_area()).context("drawing the PNG")?;
    svg(SVGBackend::new(&tmp_svg, size).into_drawing_area()).context("drawing the SVG")?;
    std::fs::rename(&tmp_png, stem.with_extension("png"))?;
    std::fs::rename(&tmp_svg, stem.with_extension("svg"))?;
    Ok(())
}

/// Writes a line chart as `<stem>.png` and `<stem>.svg`.
pub fn line_chart(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    render(
        stem,
        (800, 560),
        |r| draw(r, title, x_label, y_label, series),
        |r| draw(r, title, x_label, y_label, series),
    )
}

fn draw_heatmap<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    m: &[Vec<f64>],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let k = m.len();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(36)
        .build_cartesian_2d(0..k, 0..k)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .disable_mesh()
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .draw_series(
            (0..k)
                .flat_map(|i| (0..k).map(move |j| (i, j)))
                .map(|(i, j)| {
                    let v = m[i][j].clamp(0.0, 1.0);
                    let c = RGBColor((255.0 * (1.0 - v)) as u8, (255.0 * (1.0 - v)) as u8, 255);
                    Rectangle::new([(j, k - 1 - i), (j + 1, k - i)], c.filled())
                }),
        )
        .map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// Writes a square matrix of values in [0, 1] (row 0 at the top, white to
/// blue) as `<stem>.png` and `<stem>.svg`.
pub fn heatmap(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    m: &[Vec<f64>],
) -> anyhow::Result<()> {
    render(
        stem,
        (560, 600),
        |r| draw_heatmap(r, title, x_label, y_label, m),
        |r| draw_heatmap(r, title, x_label, y_label, m),
    )
}

/// A chart with f64 axes on both sides, as bar charts draw.
type BarChart<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A bar chart's margin and the height of its x-label area, in pixels.
const BAR_MARGIN: u32 = 12;
const BAR_X_LABELS: u32 = 40;

/// The axes of a bar chart: one slot per label along x (the label under its
/// centre), y from 0 to 15 % above the tallest finite value (1 when none),
/// or higher where a legend of `legend_rows` entries must fit above the
/// bars; returns the chart and that top. Font sizes: caption, then axis labels.
fn bar_axes<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    labels: &[String],
    values: impl Iterator<Item = f64>,
    (caption, label_size): (u32, u32),
    legend_rows: usize,
) -> anyhow::Result<(BarChart<'a, DB>, f64)>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let top = values.filter(|v| v.is_finite()).fold(0f64, f64::max);
    // Headroom above the tallest bar: 15 %, or more where a legend of
    // `legend_rows` entries (about 22 px each, drawn in the upper right
    // corner) must fit above the bars; the plotting area is the height
    // less the margins, the caption and the x labels.
    let plot_height = root.dim_in_pixel().1 as f64
        - (2 * BAR_MARGIN + BAR_X_LABELS) as f64
        - 1.5 * caption as f64;
    let legend = if legend_rows > 0 {
        (22 * legend_rows + 24) as f64
    } else {
        0.0
    };
    let headroom = (1.0 / (1.0 - legend / plot_height).max(0.2)).max(1.15);
    let top = if top > 0.0 { top * headroom } else { 1.0 };
    let n = labels.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", caption))
        .margin(BAR_MARGIN)
        .x_label_area_size(BAR_X_LABELS)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 && i < labels.len() {
                labels[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style(("sans-serif", label_size))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok((chart, top))
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    bars: &[(String, f64)],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let (mut chart, top) = bar_axes(
        &root,
        title,
        y_label,
        &labels,
        bars.iter().map(|b| b.1),
        (22, 14),
        0,
    )?;
    for (i, (_, v)) in bars.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        let color = Palette99::pick(i).to_rgba();
        let x = i as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *v)],
                color.filled(),
            )))
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .draw_series(std::iter::once(Text::new(
                format_value(*v),
                (x + 0.3, *v + top * 0.02),
                ("sans-serif", 13),
            )))
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

fn format_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Writes a bar chart (one bar per `(label, value)`; non-finite values are
/// left out) as `<stem>.png` and `<stem>.svg`.
pub fn bar_chart(
    stem: &Path,
    title: &str,
    y_label: &str,
    bars: &[(String, f64)],
) -> anyhow::Result<()> {
    // Wide enough that each bar's label fits.
    let width = (90 * bars.len() as u32).max(800);
    render(
        stem,
        (width, 520),
        |r| draw_bars(r, title, y_label, bars),
        |r| draw_bars(r, title, y_label, bars),
    )
}

fn draw_grouped_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (mut chart, _) = bar_axes(
        &root,
        title,
        y_label,
        categories,
        series.iter().flat_map(|s| s.1.iter().copied()),
        (20, 13),
        series.len(),
    )?;
    let k = series.len().max(1);
    let width = 0.8 / k as f64;
    for (s, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(s).to_rgba();
        let rects: Vec<_> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| {
                let x = i as f64 + 0.1 + s as f64 * width;
                Rectangle::new([(x, 0.0), (x + width * 0.9, *v)], color.filled())
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(|e| anyhow!("{e:?}"))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    // In the headroom `bar_axes` left above the bars.
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// A grouped bar chart's width in pixels: 40 per bar, and wide enough that
/// each category's label (at about 8 pixels per character of the axis
/// font) does not run into its neighbours'; at least 900.
fn grouped_bar_width(categories: &[String], series: usize) -> u32 {
    let longest = categories
        .iter()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(0) as u32;
    let per_category = (40 * series.max(1) as u32).max(8 * longest + 12);
    (per_category * categories.len() as u32 + 120).max(900)
}

/// Writes a grouped bar chart (one group of bars per category, one colour
/// per series; non-finite values are left out) as `<stem>.png` and `<stem>.svg`.
pub fn grouped_bar_chart(
    stem: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    render(
        stem,
        (grouped_bar_width(categories, series.len()), 540),
        |r| draw_grouped_bars(r, title, y_label, categories, series),
        |r| draw_grouped_bars(r, title, y_label, categories, series),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the legend goes for `series` on an 800 × 520 chart of the unit
    /// square (padded as `draw` pads it).
    fn legend_for(series: &[Series]) -> SeriesLabelPosition {
        register();
        let mut buf = vec![0u8; 800 * 520 * 3];
        let root = BitMapBackend::with_buffer(&mut buf, (800, 520)).into_drawing_area();
        let chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.05..1.05, -0.05..1.05)
            .unwrap();
        legend_position(&chart, series).unwrap()
    }

    #[test]
    fn the_legend_goes_where_it_hides_no_data() {
        use SeriesLabelPosition::*;
        let dots = |name: &str, p: fn(f64) -> (f64, f64)| {
            Series::dots(name, (0..=10).map(|i| p(i as f64 / 10.0)).collect())
        };
        // Nothing at the right edge: plotters' default place.
        assert_eq!(legend_for(&[dots("low", |t| (t * 0.5, 0.0))]), MiddleRight);
        // Dots down the right edge and along the top: the first free corner.
        let right = dots("right edge", |t| (1.0, t));
        let top = dots("top", |t| (t, 1.0));
        assert_eq!(legend_for(&[right.clone(), top]), LowerLeft);
        assert_eq!(legend_for(&[right]), UpperLeft);
        // A line of two points across the middle hides under the default
        // place along its length, not at its ends.
        let across = Series::line("across", vec![(0.0, 0.5), (1.0, 0.5)]);
        assert_eq!(legend_for(&[across]), UpperRight);
    }

    #[test]
    fn grouped_bars_are_wide_enough_for_their_labels() {
        let short: Vec<String> = (0..16).map(|i| format!("m{i}")).collect();
        assert_eq!(grouped_bar_width(&short, 1), 900);
        // 16 methods named like the merge study's ("task arithmetic": 15 characters).
        let long: Vec<String> = (0..16).map(|_| "task arithmetic".to_string()).collect();
        let w = grouped_bar_width(&long, 1);
        assert!(w as f64 / 16.0 >= 15.0 * 8.0, "{w}");
        // Many series widen the groups, not the labels.
        assert_eq!(grouped_bar_width(&short, 4), 160 * 16 + 120);
    }

    /// Draws a grouped bar chart of `series` series whose bars all reach 1.0
    /// into an RGB buffer, and returns the lowest pixel row of the legend's
    /// black frame in the right quarter above the x axis and the highest
    /// row any bar reaches there.
    fn legend_bottom_and_bar_top(series: usize) -> (usize, usize) {
        register();
        let categories: Vec<String> = (0..6).map(|i| format!("method {i}")).collect();
        let data: Vec<(String, Vec<f64>)> = (0..series)
            .map(|s| (format!("family {s}"), vec![1.0; categories.len()]))
            .collect();
        let (w, h) = (grouped_bar_width(&categories, series) as usize, 540);
        let mut buf = vec![0u8; w * h * 3];
        {
            let root =
                BitMapBackend::with_buffer(&mut buf, (w as u32, h as u32)).into_drawing_area();
            draw_grouped_bars(root, "t", "y", &categories, &data).unwrap();
        }
        let colours: Vec<(u8, u8, u8)> = (0..series)
            .map(|s| {
                let c = Palette99::pick(s).to_rgba();
                (c.0, c.1, c.2)
            })
            .collect();
        let pixel = |x: usize, y: usize| {
            let i = (y * w + x) * 3;
            (buf[i], buf[i + 1], buf[i + 2])
        };
        let (mut legend_bottom, mut bar_top) = (0, h);
        // Above the x axis (its line and labels take the bottom 60 rows).
        for y in 0..h - 60 {
            let row: Vec<_> = (w * 3 / 4..w - 14).map(|x| pixel(x, y)).collect();
            // The frame's bottom edge: a long run of black.
            if row.iter().filter(|&&p| p == (0, 0, 0)).count() > 40 {
                legend_bottom = y;
            }
            if bar_top == h && row.iter().filter(|p| colours.contains(p)).count() > 60 {
                bar_top = y;
            }
        }
        (legend_bottom, bar_top)
    }

    #[test]
    fn a_grouped_bar_charts_legend_sits_above_its_bars() {
        for series in [1, 3, 7] {
            let (legend_bottom, bar_top) = legend_bottom_and_bar_top(series);
            assert!(legend_bottom > 0, "{series} series: no legend frame found");
            assert!(
                legend_bottom < bar_top,
                "{series} series: the legend reaches row {legend_bottom}, the bars row {bar_top}"
            );
        }
    }

    /// The SVG of a one-series chart, and how many stroked shapes it draws.
    fn svg_of(series: Series) -> (String, usize) {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("chart");
        line_chart(&stem, "t", "x", "y", &[series]).unwrap();
        let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
        assert!(stem.with_extension("png").exists());
        let shapes = svg.matches("<polyline").count() + svg.matches("<line").count();
        (svg, shapes)
    }

    #[test]
    fn a_dashed_line_is_drawn_in_pieces_and_a_solid_one_whole() {
        let pts = vec![(0.0, 0.0), (1.0, 1.0), (2.0, 0.5)];
        let (solid, solid_shapes) = svg_of(Series::line("a", pts.clone()).colored(0));
        let (dashed, dashed_shapes) = svg_of(Series::line("a", pts).colored(0).dashed());
        assert_ne!(solid, dashed);
        // The dashed curve and its legend sample are many short strokes
        // (dash 8 px, gap 5 px over a curve hundreds of pixels long).
        assert!(
            dashed_shapes > solid_shapes + 20,
            "dashed {dashed_shapes} shapes, solid {solid_shapes}"
        );
    }
}
