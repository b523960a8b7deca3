// The study report: one self-contained XHTML-compatible HTML page with inline SVG charts, no external assets.
//
//   recall vs k and mass vs k      one line per selector (per workload)
//   fidelity vs cost               mean recall against key bytes read per row, every (selector, k), with the
//                                  Pareto frontier (no other point is both cheaper and more faithful)
//   recall by group and position   heatmap per selector at the largest k: rows are selection groups (heads),
//                                  columns query tokens (positions)
//   entropy vs recall              one dot per row (query token, group) at the largest k, coloured by selector
//   recall by layer and group      when the suite runs two or more layers of one dump (workloads named
//                                  "dump(<model>, layer L)" or "<name> layer L"): per dump, one heatmap per
//                                  selector of mean recall over query tokens at the largest k, rows layers,
//                                  columns groups (heads)
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
