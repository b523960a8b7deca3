// The study report: one self-contained XHTML-compatible HTML page with inline SVG charts, no external assets.
//
//   recall vs k and mass vs k      one line per selector (per workload)
//   fidelity vs cost               mean recall against key bytes read per row, every (selector, k), with the
//                                  Pareto frontier (no other point is both cheaper and more faithful)
//   accuracy against fidelity      studies over a model (tiny-lm): bits per byte against mean recall and
//                                  against mean mass, one point per selector and k, full attention dashed;
//                                  the increase over full attention on a log scale against both
//   recall by group and position   heatmap per selector at the largest k: rows are selection groups (heads;
//                                  (layer, group) over a model), columns query tokens (positions), or the
//                                  means over 64 runs of consecutive tokens when there are more
//   entropy vs recall              one dot per row (query token, group) at the largest k, coloured by selector
//                                  (every n-th row of a large study)
//   recall by layer and group      when the suite runs two or more layers of one dump (workloads named
//                                  "dump(<model>, layer L)" or "<name> layer L"), and per study over a
//                                  model's layers: one heatmap per selector of mean recall over query tokens
//                                  at the largest k, rows layers, columns groups (heads)
// All text is escaped; the page parses as XML.
#pragma once

#include <string>
#include <string_view>

#include "keysel/recall/study_config.h"

namespace keysel {

/// The report page for a study suite.
std::string study_report_html(const StudySuiteResult& result);

/// `text` with &, <, >, " and ' replaced by their entities.
std::string escape_html(std::string_view text);

}  // namespace keysel
