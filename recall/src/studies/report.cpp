// The study report (report.h): XHTML-compatible HTML with inline SVG, built as plain strings.
#include "keysel/recall/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keysel {
namespace {

constexpr const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
const char* color(std::size_t i) { return kPalette[i % (sizeof kPalette / sizeof kPalette[0])]; }

std::string num(double v, const char* format = "%.4g") {
  if (!std::isfinite(v)) return "nan";
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, format, v);
  return buffer;
}
std::string px(double v) { return num(v, "%.1f"); }
/// An axis tick's label: 3 significant digits, thousands as "k" and millions as "M" (100k, 2M rather than
/// 1e+05, 2e+06).
std::string tick_label(double v) {
  const double a = std::abs(v);
  if (std::isfinite(v) && a >= 1e6) return num(v / 1e6, "%.3g") + "M";
  if (std::isfinite(v) && a >= 1e4) return num(v / 1e3, "%.3g") + "k";
  return num(v, "%.3g");
}

struct Point {
  double x = 0, y = 0;
  std::string label;
};
struct Series {
  std::string name;
  std::vector<Point> points;
};

/// Axis mapping; a log axis needs positive values.
struct Axis {
  double lo = 0, hi = 1;
  bool log = false;
  double pixel_lo = 0, pixel_hi = 1;
  double map(double v) const {
    const double a = log ? std::log10(std::max(lo, 1e-300)) : lo;
    const double b = log ? std::log10(std::max(hi, 1e-300)) : hi;
    const double x = log ? std::log10(std::max(v, 1e-300)) : v;
    const double f = b > a ? (x - a) / (b - a) : 0.5;
    return pixel_lo + f * (pixel_hi - pixel_lo);
  }
};

constexpr double kWidth = 560, kHeight = 340, kLeft = 64, kRight = 170, kTop = 34, kBottom = 48;

/// How a chart draws its data.
struct ChartStyle {
  bool log_x = false;
  bool log_y = false;             // a log y axis (points with y <= 0 are left out); y_from_zero does not apply
  bool lines = false;             // polylines between a series' points, else dots only
  std::vector<Point> frontier;    // when not empty, drawn as a dashed black line
  double dot_radius = 3.5;
  bool y_from_zero = true;        // else the y axis spans the data (and the reference line) only
  double reference_y = std::numeric_limits<double>::quiet_NaN();  // when finite, a dashed horizontal line
  std::string reference_label;    // its legend entry
  std::vector<double> x_ticks;    // when not empty, the x axis is ticked at these values (the k studied)
};

/// Rough width in pixels of `text` in the report's fonts (11 px labels, 14 px bold titles), so that titles,
/// legends and labels are given the room they need instead of being cut at the edge of their chart.
double text_width(std::string_view text, double font_px) { return 0.6 * font_px * static_cast<double>(text.size()); }

/// Tick values of an axis from lo to hi: on a log axis 1, 2 and 5 times the powers of ten inside it (the
/// powers only when those are many), else 5 even steps.
std::vector<double> axis_ticks(double lo, double hi, bool log) {
  std::vector<double> ticks;
  if (log && lo > 0 && hi > lo) {
    for (const bool powers_only : {false, true}) {
      ticks.clear();
      for (int e = static_cast<int>(std::floor(std::log10(lo))); e <= static_cast<int>(std::ceil(std::log10(hi)));
           ++e) {
        for (const double m : {1.0, 2.0, 5.0}) {
          if (powers_only && m != 1.0) continue;
          const double v = m * std::pow(10.0, e);
          if (v >= lo && v <= hi) ticks.push_back(v);
        }
      }
      if (ticks.size() <= 8) break;
    }
    if (ticks.size() >= 2) return ticks;
    ticks.clear();
    for (int i = 0; i <= 4; ++i) ticks.push_back(std::pow(10.0, std::log10(lo) + (std::log10(hi) - std::log10(lo)) * i / 4));
    return ticks;
  }
  for (int i = 0; i <= 4; ++i) ticks.push_back(lo + (hi - lo) * i / 4);
  return ticks;
}

/// A chart with axes, ticks and a legend.
std::string chart(const std::string& title, const std::string& x_label, const std::string& y_label,
                  const std::vector<Series>& series, const ChartStyle& style) {
  const bool log_x = style.log_x;
  const bool log_y = style.log_y;
  const auto drawn = [&](const Point& p) {
    return std::isfinite(p.x) && std::isfinite(p.y) && (!log_x || p.x > 0) && (!log_y || p.y > 0);
  };
  double x_lo = std::numeric_limits<double>::infinity(), x_hi = -x_lo, y_lo = x_lo, y_hi = -x_lo;
  for (const Series& s : series) {
    for (const Point& p : s.points) {
      if (!drawn(p)) continue;
      x_lo = std::min(x_lo, p.x), x_hi = std::max(x_hi, p.x), y_lo = std::min(y_lo, p.y), y_hi = std::max(y_hi, p.y);
    }
  }
  const bool reference = std::isfinite(style.reference_y) && (!log_y || style.reference_y > 0);
  if (reference) y_lo = std::min(y_lo, style.reference_y), y_hi = std::max(y_hi, style.reference_y);
  if (!std::isfinite(x_lo)) x_lo = 1, x_hi = 2;
  if (!std::isfinite(y_lo)) y_lo = log_y ? 0.1 : 0, y_hi = 1;
  if (x_hi <= x_lo) x_hi = x_lo * (log_x ? 2 : 1) + (log_x ? 0 : 1);
  const double pad = log_x ? 1.15 : 0;
  Axis ax{log_x ? x_lo / pad : x_lo, log_x ? x_hi * pad : x_hi, log_x, kLeft, kWidth - kRight};
  Axis ay{0, 1, false, kHeight - kBottom, kTop};
  if (log_y) {
    ay.log = true;
    ay.lo = y_lo / 1.3, ay.hi = (y_hi > y_lo ? y_hi : 2 * y_lo) * 1.3;
  } else if (style.y_from_zero) {
    y_lo = std::min(y_lo, 0.0);
    if (y_hi <= y_lo) y_hi = y_lo + 1;
    ay.lo = y_lo, ay.hi = y_hi * 1.05;
  } else {
    const double margin = y_hi > y_lo ? 0.05 * (y_hi - y_lo) : std::max(0.05 * std::abs(y_hi), 0.01);
    ay.lo = y_lo - margin, ay.hi = y_hi + margin;
  }

  // Wide enough for the title and the legend's longest entry.
  double width = std::max(kWidth, 12 + text_width(title, 14) + 12);
  for (const Series& s : series) width = std::max(width, kWidth - kRight + 24 + text_width(s.name, 11) + 8);
  if (reference) width = std::max(width, kWidth - kRight + 24 + text_width(style.reference_label, 11) + 8);
  const double title_x = std::max(12.0, (kWidth - kRight) / 2 - text_width(title, 14) / 2);
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + px(width) + "\" height=\"" + px(kHeight) +
                    "\" viewBox=\"0 0 " + px(width) + " " + px(kHeight) + "\" role=\"img\">\n";
  svg += "<title>" + escape_html(title) + "</title>\n";
  svg += "<text x=\"" + px(title_x) + "\" y=\"20\" class=\"t\">" + escape_html(title) + "</text>\n";
  svg += "<rect x=\"" + px(kLeft) + "\" y=\"" + px(kTop) + "\" width=\"" + px(kWidth - kLeft - kRight) +
         "\" height=\"" + px(kHeight - kTop - kBottom) + "\" fill=\"none\" stroke=\"#999\"/>\n";
  for (const double yv : axis_ticks(ay.lo, ay.hi, log_y)) {
    svg += "<text x=\"" + px(kLeft - 6) + "\" y=\"" + px(ay.map(yv) + 4) + "\" text-anchor=\"end\" class=\"a\">" +
           tick_label(yv) + "</text>\n";
  }
  std::vector<double> x_ticks;
  for (const double v : style.x_ticks) {
    if (v >= ax.lo && v <= ax.hi) x_ticks.push_back(v);
  }
  if (x_ticks.empty()) x_ticks = axis_ticks(ax.lo, ax.hi, log_x);
  for (const double xv : x_ticks) {
    svg += "<line x1=\"" + px(ax.map(xv)) + "\" y1=\"" + px(kHeight - kBottom) + "\" x2=\"" + px(ax.map(xv)) +
           "\" y2=\"" + px(kHeight - kBottom + 4) + "\" stroke=\"#999\"/>\n";
    svg += "<text x=\"" + px(ax.map(xv)) + "\" y=\"" + px(kHeight - kBottom + 16) +
           "\" text-anchor=\"middle\" class=\"a\">" + (style.x_ticks.empty() ? tick_label(xv) : num(xv, "%.6g")) + "</text>\n";
  }
  svg += "<text x=\"" + px((kLeft + kWidth - kRight) / 2) + "\" y=\"" + px(kHeight - 10) +
         "\" text-anchor=\"middle\" class=\"a\">" + escape_html(x_label) + "</text>\n";
  svg += "<text x=\"14\" y=\"" + px((kTop + kHeight - kBottom) / 2) + "\" transform=\"rotate(-90 14 " +
         px((kTop + kHeight - kBottom) / 2) + ")\" text-anchor=\"middle\" class=\"a\">" + escape_html(y_label) +
         "</text>\n";
  for (std::size_t i = 0; i < series.size(); ++i) {
    const Series& s = series[i];
    std::string path;
    for (const Point& p : s.points) {
      if (!drawn(p)) continue;
      path += px(ax.map(p.x)) + "," + px(ay.map(p.y)) + " ";
      svg += "<circle cx=\"" + px(ax.map(p.x)) + "\" cy=\"" + px(ay.map(p.y)) + "\" r=\"" +
             num(style.dot_radius, "%.1f") +
             "\" fill=\"" + color(i) + "\" fill-opacity=\"0.8\"><title>" +
             escape_html(s.name + (p.label.empty() ? "" : " " + p.label) + ": (" + num(p.x) + ", " + num(p.y) + ")") +
             "</title></circle>\n";
    }
    if (style.lines && !path.empty()) {
      svg += "<polyline points=\"" + path + "\" fill=\"none\" stroke=\"" + color(i) + "\" stroke-width=\"1.5\"/>\n";
    }
    const double ly = kTop + 8 + 16.0 * static_cast<double>(i);
    svg += "<rect x=\"" + px(kWidth - kRight + 10) + "\" y=\"" + px(ly - 8) + "\" width=\"10\" height=\"10\" fill=\"" +
           color(i) + "\"/>\n<text x=\"" + px(kWidth - kRight + 24) + "\" y=\"" + px(ly + 1) + "\" class=\"l\">" +
           escape_html(s.name) + "</text>\n";
  }
  if (reference) {
    const double y = ay.map(style.reference_y);
    const double ly = kTop + 8 + 16.0 * static_cast<double>(series.size());
    svg += "<line x1=\"" + px(kLeft) + "\" y1=\"" + px(y) + "\" x2=\"" + px(kWidth - kRight) + "\" y2=\"" + px(y) +
           "\" stroke=\"#555\" stroke-dasharray=\"6 3\"><title>" +
           escape_html(style.reference_label + ": " + num(style.reference_y)) + "</title></line>\n";
    svg += "<line x1=\"" + px(kWidth - kRight + 8) + "\" y1=\"" + px(ly - 3) + "\" x2=\"" + px(kWidth - kRight + 22) +
           "\" y2=\"" + px(ly - 3) + "\" stroke=\"#555\" stroke-dasharray=\"4 2\"/>\n<text x=\"" +
           px(kWidth - kRight + 24) + "\" y=\"" + px(ly + 1) + "\" class=\"l\">" + escape_html(style.reference_label) +
           "</text>\n";
  }
  if (!style.frontier.empty()) {
    std::string path;
    for (const Point& p : style.frontier) {
      if (drawn(p)) path += px(ax.map(p.x)) + "," + px(ay.map(p.y)) + " ";
    }
    svg += "<polyline points=\"" + path + "\" fill=\"none\" stroke=\"#000\" stroke-dasharray=\"4 3\"/>\n";
  }
  svg += "</svg>\n";
  return svg;
}

/// Heatmap of values in [0, 1]: rows x cols, white (0) to dark blue (1); rows are labelled 0, 1, ... unless
/// `row_names` names them.
std::string heatmap(const std::string& title, const std::string& row_label, const std::string& col_label,
                    const std::vector<std::vector<double>>& cells, const std::vector<std::string>& col_names,
                    const std::vector<std::string>& row_names = {}) {
  const std::size_t rows = cells.size();
  const std::size_t cols = rows > 0 ? cells[0].size() : 0;
  const double cell = std::clamp(360.0 / static_cast<double>(std::max<std::size_t>(cols, 1)), 4.0, 28.0);
  const double cell_h = std::clamp(220.0 / static_cast<double>(std::max<std::size_t>(rows, 1)), 4.0, 22.0);
  double left = 60;
  for (std::size_t r = 0; r < rows && r < row_names.size(); ++r) left = std::max(left, text_width(row_names[r], 11) + 12);
  const double top = 34;
  const std::string caption = col_label + " " + (cols > 0 ? col_names.front() : "") + " .. " +
                              (cols > 0 ? col_names.back() : "") + " (columns); " + row_label +
                              " (rows); white 0, dark 1";
  // Wide enough for the title and the caption, however few the columns.
  const double width = std::max({left + cell * static_cast<double>(cols) + 20, 12 + text_width(title, 14) + 12,
                                 12 + text_width(caption, 11) + 12});
  const double height = top + cell_h * static_cast<double>(rows) + 40;
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + px(width) + "\" height=\"" + px(height) +
                    "\" viewBox=\"0 0 " + px(width) + " " + px(height) + "\" role=\"img\">\n<title>" +
                    escape_html(title) + "</title>\n<text x=\"12\" y=\"20\" class=\"t\">" +
                    escape_html(title) + "</text>\n";
  for (std::size_t r = 0; r < rows; ++r) {
    const std::string row_name = r < row_names.size() ? row_names[r] : std::to_string(r);
    svg += "<text x=\"" + px(left - 6) + "\" y=\"" + px(top + cell_h * (static_cast<double>(r) + 0.75)) +
           "\" text-anchor=\"end\" class=\"a\">" + escape_html(row_name) + "</text>\n";
    for (std::size_t c = 0; c < cols; ++c) {
      const double v = cells[r][c];
      std::string fill = "#eeeeee";
      if (std::isfinite(v)) {
        const double f = std::clamp(v, 0.0, 1.0);
        char buffer[16];
        std::snprintf(buffer, sizeof buffer, "#%02x%02x%02x", static_cast<int>(255 - 230 * f),
                      static_cast<int>(255 - 180 * f), static_cast<int>(255 - 80 * f));
        fill = buffer;
      }
      svg += "<rect x=\"" + px(left + cell * static_cast<double>(c)) + "\" y=\"" +
             px(top + cell_h * static_cast<double>(r)) + "\" width=\"" + px(cell) + "\" height=\"" + px(cell_h) +
             "\" fill=\"" + fill + "\"><title>" +
             escape_html(row_label + " " + row_name + ", " + col_label + " " + col_names[c] + ": " + num(v)) +
             "</title></rect>\n";
    }
  }
  svg += "<text x=\"12\" y=\"" + px(height - 12) + "\" class=\"a\">" + escape_html(caption) + "</text>\n</svg>\n";
  return svg;
}

double metric_of(const StudyRow& row, const char* name, double Aggregate::*field = &Aggregate::mean) {
  const auto it = row.metrics.find(name);
  return it == row.metrics.end() ? std::nan("") : it->second.*field;
}

/// The layer of a dump workload, read from its name: "dump(<model>, layer <L>)" (Dump::workload) or
/// "<name> layer <L>" (a named dump run over several layers, study_config.cpp). `dump` receives the name
/// without the layer ("dump(<model>)", "<name>"). False for other names.
bool dump_layer_of(const std::string& name, std::string& dump, std::int64_t& layer) {
  std::string_view text = name;
  const bool parenthesis = !text.empty() && text.back() == ')';
  if (parenthesis) text.remove_suffix(1);
  std::size_t digits = text.size();
  while (digits > 0 && text[digits - 1] >= '0' && text[digits - 1] <= '9') --digits;
  if (digits == text.size() || text.size() - digits > 9) return false;
  constexpr std::string_view kLayer = "layer ";
  if (digits < kLayer.size() || text.substr(digits - kLayer.size(), kLayer.size()) != kLayer) return false;
  layer = std::stoll(std::string(text.substr(digits)));
  std::string_view prefix = text.substr(0, digits - kLayer.size());
  while (!prefix.empty() && (prefix.back() == ' ' || prefix.back() == ',')) prefix.remove_suffix(1);
  if (digits > kLayer.size() && text[digits - kLayer.size() - 1] != ' ') return false;
  dump = std::string(prefix) + (parenthesis ? ")" : "");
  return true;
}

/// Mean recall over query tokens per group of the layer at `layer_index` of a row (row_metrics over (layer, t,
/// group) with `layers` layers; 1 for a single attention); empty without row metrics.
std::vector<double> group_recall_means(const StudyRow& row, std::int64_t tokens, std::size_t layers,
                                       std::size_t layer_index) {
  if (row.row_metrics.empty() || tokens <= 0) return {};
  const std::size_t t_count = static_cast<std::size_t>(tokens);
  const std::size_t groups = row.row_metrics.size() / (t_count * layers);
  std::vector<double> means(groups, std::nan(""));
  const std::size_t base = layer_index * t_count * groups;
  for (std::size_t g = 0; g < groups; ++g) {
    double sum = 0;
    std::size_t count = 0;
    for (std::size_t t = 0; t < t_count; ++t) {
      const double v = row.row_metrics[base + t * groups + g].recall;
      if (std::isfinite(v)) sum += v, ++count;
    }
    if (count > 0) means[g] = sum / static_cast<double>(count);
  }
  return means;
}

/// One section of layer x group heatmaps: for every selector, `cells(name)` gives one row of group means per
/// layer (empty rows where the selector has none).
std::string layer_section(const std::string& source, std::int64_t k_max, const std::vector<std::string>& names,
                          const std::vector<std::int64_t>& layer_indices,
                          const std::function<std::vector<std::vector<double>>(const std::string&)>& cells_of) {
  std::string html = "<h2>Recall by layer and group (head): " + escape_html(source) + "</h2>\n<p>" +
                     escape_html("Mean recall over query tokens at k = " + std::to_string(k_max) + ", " +
                                 std::to_string(layer_indices.size()) + " layers; rows are layers, columns selection " +
                                 "groups (heads or key heads, by granularity). by_row.csv holds every row.") +
                     "</p>\n<div>\n";
  std::vector<std::string> row_names;
  for (const std::int64_t layer : layer_indices) row_names.push_back(std::to_string(layer));
  for (const std::string& name : names) {
    std::vector<std::vector<double>> cells = cells_of(name);
    std::size_t columns = 0;
    for (const std::vector<double>& r : cells) columns = std::max(columns, r.size());
    if (columns == 0) continue;
    for (std::vector<double>& r : cells) r.resize(columns, std::nan(""));
    std::vector<std::string> col_names(columns);
    for (std::size_t c = 0; c < columns; ++c) col_names[c] = std::to_string(c);
    html += heatmap(name + ": recall by layer and head", "layer", "group", cells, col_names, row_names);
  }
  return html + "</div>\n";
}

/// Selector names of some studies' rows, in first-seen order, and their largest k.
void names_and_k_max(const std::vector<const StudyResult*>& studies, std::vector<std::string>& names,
                     std::int64_t& k_max) {
  k_max = 0;
  for (const StudyResult* study : studies) {
    for (const std::int64_t k : study->options.k_values) k_max = std::max(k_max, k);
    for (const StudyRow& row : study->rows) {
      if (std::find(names.begin(), names.end(), row.selector) == names.end()) names.push_back(row.selector);
    }
  }
}

/// Per dump run over two or more layers, and per study over a model's layers (tiny-lm): one heatmap per
/// selector of mean recall (over query tokens) by layer (rows) and group (columns) at the largest k.
std::string layer_heatmaps(const StudySuiteResult& result) {
  std::vector<std::string> dumps;  // first-seen order
  std::map<std::string, std::vector<std::pair<std::int64_t, std::size_t>>> layers;  // dump -> (layer, workload)
  for (std::size_t w = 0; w < result.studies.size(); ++w) {
    std::string dump;
    std::int64_t layer = 0;
    if (!result.studies[w].layers.empty() || !dump_layer_of(result.studies[w].workload, dump, layer)) continue;
    if (!layers.contains(dump)) dumps.push_back(dump);
    layers[dump].emplace_back(layer, w);
  }
  std::string html;
  for (const std::string& dump : dumps) {
    auto& runs = layers[dump];
    if (runs.size() < 2) continue;
    std::stable_sort(runs.begin(), runs.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<const StudyResult*> studies;
    std::vector<std::int64_t> layer_indices;
    for (const auto& [layer, w] : runs) {
      studies.push_back(&result.studies[w]);
      layer_indices.push_back(layer);
    }
    std::int64_t k_max = 0;
    std::vector<std::string> names;
    names_and_k_max(studies, names, k_max);
    html += layer_section(dump, k_max, names, layer_indices, [&](const std::string& name) {
      std::vector<std::vector<double>> cells;
      for (const StudyResult* study : studies) {
        std::vector<double> means;
        for (const StudyRow& row : study->rows) {
          if (row.selector == name && row.k == k_max) {
            means = group_recall_means(row, study->shape.tokens, 1, 0);
            break;
          }
        }
        cells.push_back(std::move(means));
      }
      return cells;
    });
  }
  for (const StudyResult& study : result.studies) {
    if (study.layers.size() < 2) continue;
    std::int64_t k_max = 0;
    std::vector<std::string> names;
    names_and_k_max({&study}, names, k_max);
    html += layer_section(study.workload, k_max, names, study.layers, [&](const std::string& name) {
      std::vector<std::vector<double>> cells(study.layers.size());
      for (const StudyRow& row : study.rows) {
        if (row.selector != name || row.k != k_max) continue;
        for (std::size_t l = 0; l < study.layers.size(); ++l) {
          cells[l] = group_recall_means(row, study.shape.tokens, study.layers.size(), l);
        }
        break;
      }
      return cells;
    });
  }
  return html;
}

/// Bits per byte against mean recall and against mean mass, one point per selector and k, with full
/// attention's bits per byte as a dashed line (studies over a model).
std::string accuracy_charts(const StudyResult& study, const std::vector<std::string>& names,
                            const std::vector<double>& k_ticks) {
  std::vector<Series> by_recall, by_mass, increase_by_recall, increase_by_mass;
  std::size_t not_above_full = 0;
  for (const std::string& name : names) {
    Series r{name, {}}, m{name, {}}, ir{name, {}}, im{name, {}};
    for (const StudyRow& row : study.rows) {
      if (row.selector != name) continue;
      const double bpb = metric_of(row, "bpb");
      const double increase = metric_of(row, "bpb_increase");
      const std::string label = "k=" + std::to_string(row.k);
      r.points.push_back({metric_of(row, "recall"), bpb, label});
      m.points.push_back({metric_of(row, "mass"), bpb, label});
      ir.points.push_back({metric_of(row, "recall"), increase, label});
      im.points.push_back({metric_of(row, "mass"), increase, label});
      not_above_full += !(increase > 0);
    }
    by_recall.push_back(std::move(r));
    by_mass.push_back(std::move(m));
    increase_by_recall.push_back(std::move(ir));
    increase_by_mass.push_back(std::move(im));
  }
  ChartStyle style;
  style.lines = true;
  style.y_from_zero = false;
  style.reference_y = study.full_bpb.mean;
  style.reference_label = "full attention";
  std::string html =
      "<h3>Accuracy against fidelity</h3>\n<p>" +
      escape_html("The model's bits per byte (lower is better) with every layer's attention restricted to each "
                  "selector's keys, against mean recall and mean attention mass over all layers' rows; one point per "
                  "selector and k (joined in k order). The dashed line is full attention: " +
                  num(study.full_bpb.mean, "%.4f") + " bits per byte over " + std::to_string(study.full_bpb.count) +
                  " predicted bytes.") +
      "</p>\n<div>\n";
  html += chart("bits per byte vs recall", "mean recall (all layers)", "bits per byte", by_recall, style);
  html += chart("bits per byte vs mass", "mean attention mass (all layers)", "bits per byte", by_mass, style);
  // The same increases on a log axis, where the selectors close to full attention are told apart.
  ChartStyle log_style;
  log_style.lines = true;
  log_style.log_y = true;
  html += "</div>\n<p>" +
          escape_html("The same increase over full attention on a log scale, which tells apart the selectors close "
                      "to full attention" +
                      (not_above_full > 0 ? " (" + std::to_string(not_above_full) +
                                                " points at or below full attention are left out)."
                                          : std::string("."))) +
          "</p>\n<div>\n";
  html += chart("bpb increase vs recall", "mean recall (all layers)", "bits per byte over full attention (log scale)",
                increase_by_recall, log_style);
  html += chart("bpb increase vs mass", "mean attention mass (all layers)",
                "bits per byte over full attention (log scale)", increase_by_mass, log_style);
  html += "</div>\n<div>\n";
  // Against k, with the values studied as ticks.
  std::vector<Series> bpb_by_k, sparse_by_k;
  bool sparse = false;
  for (const std::string& name : names) {
    Series b{name, {}}, sb{name, {}};
    for (const StudyRow& row : study.rows) {
      if (row.selector != name) continue;
      b.points.push_back({static_cast<double>(row.k), metric_of(row, "bpb"), ""});
      sb.points.push_back({static_cast<double>(row.k), metric_of(row, "bpb_sparse"), ""});
      sparse = sparse || row.metrics.contains("bpb_sparse");
    }
    bpb_by_k.push_back(std::move(b));
    sparse_by_k.push_back(std::move(sb));
  }
  ChartStyle by_k = style;
  by_k.log_x = true;
  by_k.x_ticks = k_ticks;
  html += chart("bits per byte vs k", "k (log scale)", "bits per byte", bpb_by_k, by_k);
  if (sparse) {
    ChartStyle sparse_style = by_k;
    sparse_style.reference_y = std::numeric_limits<double>::quiet_NaN();
    html += chart("bits per byte at positions >= 2k vs k", "k (log scale)", "bits per byte (positions >= 2k)",
                  sparse_by_k, sparse_style);
  }
  html += "</div>\n";
  if (study.full_exact_match.count == 0) return html;

  // A retrieval task: exact-match accuracy against recall, mass and k.
  std::vector<Series> acc_recall, acc_mass, acc_k;
  for (const std::string& name : names) {
    Series r{name, {}}, m{name, {}}, kk{name, {}};
    for (const StudyRow& row : study.rows) {
      if (row.selector != name) continue;
      const double accuracy = metric_of(row, "exact_match");
      const std::string label = "k=" + std::to_string(row.k);
      r.points.push_back({metric_of(row, "recall"), accuracy, label});
      m.points.push_back({metric_of(row, "mass"), accuracy, label});
      kk.points.push_back({static_cast<double>(row.k), accuracy, ""});
    }
    acc_recall.push_back(std::move(r));
    acc_mass.push_back(std::move(m));
    acc_k.push_back(std::move(kk));
  }
  ChartStyle acc_style;
  acc_style.lines = true;
  acc_style.reference_y = study.full_exact_match.mean;
  acc_style.reference_label = "full attention";
  html += "<h3>Task accuracy</h3>\n<p>" +
          escape_html("Exact-match accuracy (every answer byte the model's argmax, teacher-forced) over " +
                      std::to_string(study.full_exact_match.count) + " examples, with each scored row decoded over a "
                      "full-attention prefill through each selector's keys; the dashed line is full attention: " +
                      num(study.full_exact_match.mean, "%.3f") + ".") +
          "</p>\n<div>\n";
  html += chart("exact match vs recall", "mean recall (all layers)", "exact-match accuracy", acc_recall, acc_style);
  html += chart("exact match vs mass", "mean attention mass (all layers)", "exact-match accuracy", acc_mass,
                acc_style);
  ChartStyle acc_by_k = acc_style;
  acc_by_k.log_x = true;
  acc_by_k.x_ticks = k_ticks;
  html += chart("exact match vs k", "k (log scale)", "exact-match accuracy", acc_k, acc_by_k);
  return html + "</div>\n";
}

/// Per layer and selection group (head): mean attention entropy of the scored rows against the exact top-k's
/// mass (one series per k) and against the indexers' recall at the largest k (studies over a model): the
/// hypothesis that low-entropy heads suit top-k attention.
std::string entropy_by_head_charts(const StudyResult& study, std::int64_t k_max) {
  const std::size_t tokens = static_cast<std::size_t>(std::max<std::int64_t>(study.shape.tokens, 0));
  const std::size_t layers = study.layers.size();
  if (layers == 0 || tokens == 0) return "";
  std::vector<Series> mass_series, recall_series;
  for (const StudyRow& row : study.rows) {
    if (row.row_metrics.empty()) continue;
    const bool exact = row.selector.rfind("exact", 0) == 0;
    const bool indexer = row.selector.find("indexer") != std::string::npos && row.k == k_max;
    if (!exact && !indexer) continue;
    const std::size_t groups = row.row_metrics.size() / (tokens * layers);
    Series series{exact ? row.selector + " k=" + std::to_string(row.k) : row.selector, {}};
    for (std::size_t l = 0; l < layers; ++l) {
      for (std::size_t g = 0; g < groups; ++g) {
        double entropy = 0, value = 0;
        std::size_t count = 0;
        for (std::size_t t = 0; t < tokens; ++t) {
          const SelectionMetrics& m = row.row_metrics[(l * tokens + t) * groups + g];
          const double v = exact ? m.mass : m.recall;
          if (!std::isfinite(m.entropy) || !std::isfinite(v)) continue;
          entropy += m.entropy, value += v, ++count;
        }
        if (count == 0) continue;
        series.points.push_back({entropy / static_cast<double>(count), value / static_cast<double>(count),
                                 "L" + std::to_string(study.layers[l]) + " g" + std::to_string(g)});
      }
    }
    (exact ? mass_series : recall_series).push_back(std::move(series));
  }
  if (mass_series.empty() && recall_series.empty()) return "";
  std::string html =
      "<h3>Attention entropy by layer and head</h3>\n<p>" +
      escape_html("One dot per layer and selection group (head, or key head, or the layer with per_token "
                  "selections): the mean entropy (nats) of the attention distribution over the scored rows, "
                  "against the mass the exact top-k holds and against the indexers' recall at k = " +
                  std::to_string(k_max) + ". Low-entropy heads concentrate their attention on few keys, which "
                  "top-k attention keeps.") +
      "</p>\n<div>\n";
  ChartStyle dots;
  dots.y_from_zero = false;
  if (!mass_series.empty()) {
    html += chart("exact top-k mass vs entropy, per head", "mean attention entropy (nats)", "mean top-k mass",
                  mass_series, dots);
  }
  if (!recall_series.empty()) {
    html += chart("indexer recall vs entropy, per head", "mean attention entropy (nats)", "mean recall",
                  recall_series, dots);
  }
  return html + "</div>\n";
}

}  // namespace

std::string escape_html(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default:
        // Control characters are not allowed in XML 1.0 text.
        if (static_cast<unsigned char>(c) < 0x20 && c != '\n' && c != '\t') {
          out += '?';
        } else {
          out += c;
        }
    }
  }
  return out;
}

std::string study_report_html(const StudySuiteResult& result) {
  std::string html =
      "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
      "<title>keysel study report</title>\n<style>\n"
      "body { font-family: sans-serif; margin: 24px; color: #222; }\n"
      "table { border-collapse: collapse; font-size: 13px; }\n"
      "td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }\n"
      "td.n, th.n { text-align: left; }\n"
      "svg { margin: 8px 12px 8px 0; }\n"
      ".t { font-size: 14px; font-weight: bold; }\n.a { font-size: 11px; }\n.l { font-size: 11px; }\n"
      "</style>\n</head>\n<body>\n<h1>keysel study report</h1>\n";

  html += "<h2>Selectors</h2>\n<table>\n<tr><th class=\"n\">name</th><th class=\"n\">spec</th></tr>\n";
  for (const StudySelectorSpec& s : result.config.selectors) {
    html += "<tr><td class=\"n\">" + escape_html(s.name) + "</td><td class=\"n\"><code>" + escape_html(s.spec_json) +
            "</code></td></tr>\n";
  }
  html += "</table>\n";
  html += layer_heatmaps(result);

  for (std::size_t w = 0; w < result.studies.size(); ++w) {
    const StudyResult& study = result.studies[w];
    const AttentionShape& s = study.shape;
    const bool model = !study.layers.empty();
    html += "<h2>Workload " + escape_html(study.workload) + "</h2>\n<p>" +
            escape_html("T=" + std::to_string(s.tokens) + " query tokens, N=" + std::to_string(s.keys) +
                        " keys, Hq=" + std::to_string(s.query_heads) + ", Hkv=" + std::to_string(s.kv_heads) +
                        ", D=" + std::to_string(s.head_dim) + "; granularity " +
                        std::string(granularity_name(study.options.granularity)) + ", kept keys " +
                        std::to_string(study.options.n_sink) + " sinks + " + std::to_string(study.options.n_local) +
                        " local" +
                        (model ? "; a model's forward pass: every layer's attention (" +
                                     std::to_string(study.layers.size()) + " layers) restricted to the selection, " +
                                     "metrics over all layers' rows, bits per byte of the model's predictions"
                               : std::string())) +
            "</p>\n";

    // Summary table.
    html += "<table>\n<tr><th class=\"n\">selector</th><th>k</th><th>recall</th><th>recall p5</th><th>mass</th>"
            "<th>mass_ratio</th><th>kl</th><th>top1</th><th>out_err</th>";
    const bool task = study.full_exact_match.count > 0;
    if (model) html += "<th>bits per byte</th><th>bpb increase</th>";
    if (task) html += "<th>exact match</th>";
    html += "<th>key bytes / row</th><th>MACs / row</th></tr>\n";
    for (const StudyRow& row : study.rows) {
      const double rows = std::max<double>(1.0, static_cast<double>(row.cost.rows));
      html += "<tr><td class=\"n\">" + escape_html(row.selector) + "</td><td>" + std::to_string(row.k) + "</td><td>" +
              num(metric_of(row, "recall")) + "</td><td>" + num(metric_of(row, "recall", &Aggregate::p5)) + "</td><td>" +
              num(metric_of(row, "mass")) + "</td><td>" + num(metric_of(row, "mass_ratio")) + "</td><td>" +
              num(metric_of(row, "kl")) + "</td><td>" + num(metric_of(row, "top1")) + "</td><td>" +
              num(metric_of(row, "out_err")) + "</td><td>";
      if (model) html += num(metric_of(row, "bpb")) + "</td><td>" + num(metric_of(row, "bpb_increase")) + "</td><td>";
      if (task) html += num(metric_of(row, "exact_match")) + "</td><td>";
      html += num(row.cost.key_bytes_read / rows) + "</td><td>" + num(row.cost.macs / rows) + "</td></tr>\n";
    }
    if (model) {
      html += "<tr><td class=\"n\">full attention</td><td>" + std::to_string(s.keys) +
              "</td><td></td><td></td><td></td><td></td><td></td><td></td><td></td><td>" + num(study.full_bpb.mean) +
              "</td><td>0</td>" + (task ? "<td>" + num(study.full_exact_match.mean) + "</td>" : std::string()) +
              "<td></td><td></td></tr>\n";
    }
    html += "</table>\n";

    // Selectors in first-seen order.
    std::vector<std::string> names;
    for (const StudyRow& row : study.rows) {
      if (std::find(names.begin(), names.end(), row.selector) == names.end()) names.push_back(row.selector);
    }
    std::vector<Series> recall_series, mass_series, cost_series;
    std::vector<Point> all_cost;
    for (const std::string& name : names) {
      Series r{name, {}}, m{name, {}}, c{name, {}};
      for (const StudyRow& row : study.rows) {
        if (row.selector != name) continue;
        const double kk = static_cast<double>(row.k);
        r.points.push_back({kk, metric_of(row, "recall"), ""});
        m.points.push_back({kk, metric_of(row, "mass"), ""});
        const double cost = row.cost.key_bytes_read / std::max<double>(1.0, static_cast<double>(row.cost.rows));
        c.points.push_back({cost, metric_of(row, "recall"), "k=" + std::to_string(row.k)});
        all_cost.push_back(c.points.back());
      }
      recall_series.push_back(std::move(r));
      mass_series.push_back(std::move(m));
      cost_series.push_back(std::move(c));
    }
    // Pareto frontier: by increasing cost, keep points more faithful than every cheaper one.
    std::sort(all_cost.begin(), all_cost.end(), [](const Point& a, const Point& b) {
      return a.x < b.x || (a.x == b.x && a.y > b.y);
    });
    std::vector<Point> frontier;
    for (const Point& p : all_cost) {
      if (!std::isfinite(p.y) || p.x <= 0) continue;
      if (frontier.empty() || p.y > frontier.back().y) frontier.push_back(p);
    }
    std::vector<double> k_ticks;
    for (const std::int64_t k : study.options.k_values) k_ticks.push_back(static_cast<double>(k));
    if (model) html += accuracy_charts(study, names, k_ticks);
    ChartStyle by_k;
    by_k.log_x = true;
    by_k.lines = true;
    by_k.x_ticks = k_ticks;
    html += "<h3>Fidelity against k</h3>\n<div>\n";
    html += chart("recall vs k", "k (log scale)", "mean recall", recall_series, by_k);
    html += chart("mass vs k", "k (log scale)", "mean attention mass", mass_series, by_k);
    html += "</div>\n<h3>Fidelity against cost</h3>\n<p>Cost: key bytes read per row (query token and group), "
            "SPEC section 5; the dashed line is the Pareto frontier. Selectors that read no keys are left out.</p>\n<div>\n";
    ChartStyle by_cost;
    by_cost.log_x = true;
    by_cost.frontier = std::move(frontier);
    html += chart("recall vs key bytes read", "key bytes read per row (log scale)", "mean recall", cost_series,
                  by_cost);
    html += "</div>\n";

    // Per-row charts at the largest k.
    const std::int64_t k_max = *std::max_element(study.options.k_values.begin(), study.options.k_values.end());
    const std::size_t tokens = static_cast<std::size_t>(std::max<std::int64_t>(s.tokens, 0));
    const std::size_t layers = std::max<std::size_t>(study.layers.size(), 1);
    // Up to 64 columns: one per query token, or runs of consecutive tokens (mean recall over each).
    const std::size_t columns = std::min<std::size_t>(tokens, 64);
    const auto run_begin = [&](std::size_t c) { return c * tokens / std::max<std::size_t>(columns, 1); };
    std::vector<std::string> col_names(columns);
    for (std::size_t c = 0; c < columns; ++c) {
      const std::size_t first = run_begin(c), last = run_begin(c + 1) - 1;
      col_names[c] = std::to_string(result.positions[w][first]);
      if (last > first) col_names[c] += "-" + std::to_string(result.positions[w][last]);
    }
    html += "<h3>Recall by " + std::string(model ? "layer, " : "") + "group (head) and query position, k = " +
            std::to_string(k_max) + "</h3>\n";
    if (tokens > columns) {
      html += "<p>" + escape_html("Each column is the mean over a run of " + std::to_string(tokens / columns) + " to " +
                                  std::to_string((tokens + columns - 1) / columns) + " consecutive query tokens of " +
                                  std::to_string(tokens) + "; by_row.csv holds every row.") +
              "</p>\n";
    }
    html += "<div>\n";
    std::vector<Series> entropy_series;
    std::size_t selectors_at_k_max = 0;
    for (const StudyRow& row : study.rows) selectors_at_k_max += row.k == k_max && !row.row_metrics.empty();
    // Dots per selector in the entropy chart: every row, or every stride-th row of a large study.
    const std::size_t dots = std::max<std::size_t>(200, 6000 / std::max<std::size_t>(selectors_at_k_max, 1));
    std::size_t stride = 1;
    for (const StudyRow& row : study.rows) {
      if (row.k != k_max || row.row_metrics.empty() || tokens == 0) continue;
      const std::size_t groups = row.row_metrics.size() / (tokens * layers);
      std::vector<std::vector<double>> cells(layers * groups, std::vector<double>(columns));
      std::vector<std::string> row_names;
      for (std::size_t l = 0; l < layers; ++l) {
        for (std::size_t g = 0; g < groups; ++g) {
          std::string row_name = std::to_string(g);
          if (model) row_name = std::string("L").append(std::to_string(study.layers[l])).append(" g").append(row_name);
          row_names.push_back(std::move(row_name));
          for (std::size_t c = 0; c < columns; ++c) {
            double sum = 0;
            std::size_t count = 0;
            for (std::size_t t = run_begin(c); t < run_begin(c + 1); ++t) {
              const double v = row.row_metrics[(l * tokens + t) * groups + g].recall;
              if (std::isfinite(v)) sum += v, ++count;
            }
            cells[l * groups + g][c] = count > 0 ? sum / static_cast<double>(count) : std::nan("");
          }
        }
      }
      html += heatmap(row.selector, model ? "layer and group" : "group", "position", cells, col_names, row_names);
      stride = (row.row_metrics.size() + dots - 1) / dots;
      Series e{row.selector, {}};
      for (std::size_t i = 0; i < row.row_metrics.size(); i += stride) {
        e.points.push_back({row.row_metrics[i].entropy_normalized, row.row_metrics[i].recall, ""});
      }
      entropy_series.push_back(std::move(e));
    }
    html += "</div>\n";
    if (model) html += entropy_by_head_charts(study, k_max);
    html += "<h3>Attention entropy against recall, k = " + std::to_string(k_max) + "</h3>\n<div>\n";
    ChartStyle dots_only;
    dots_only.dot_radius = 2.5;
    html += chart(stride > 1 ? "entropy vs recall (one dot per " + std::to_string(stride) + " rows)"
                             : std::string("entropy vs recall (one dot per row)"),
                  "entropy / log(allowed keys)", "recall", entropy_series, dots_only);
    html += "</div>\n";
  }
  html += "<p>Written by keysel. results.csv and by_row.csv hold every number drawn here.</p>\n</body>\n</html>\n";
  return html;
}

}  // namespace keysel
