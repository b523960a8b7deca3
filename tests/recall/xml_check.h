// A small XML well-formedness check for the study report tests (report.html must parse as XML).
#pragma once

#include <string>
#include <vector>

namespace keysel::test {

/// Balanced, properly nested tags, quoted attributes, entities only as &name; or &#digits;, no raw '<' in
/// text. Returns an empty string when well-formed, else what is wrong.
inline std::string xml_problem(const std::string& doc) {
  std::vector<std::string> stack;
  std::size_t i = 0;
  const auto check_text = [&](std::size_t from, std::size_t to) -> std::string {
    for (std::size_t j = from; j < to; ++j) {
      if (doc[j] == '&') {
        const std::size_t semi = doc.find(';', j);
        if (semi == std::string::npos || semi - j > 8) return "bare & at " + std::to_string(j);
        const std::string entity = doc.substr(j + 1, semi - j - 1);
        if (entity != "amp" && entity != "lt" && entity != "gt" && entity != "quot" && entity != "apos" &&
            !(entity.size() > 1 && entity[0] == '#')) {
          return "unknown entity &" + entity + ";";
        }
      }
    }
    return "";
  };
  while (i < doc.size()) {
    const std::size_t open = doc.find('<', i);
    if (open == std::string::npos) {
      if (auto p = check_text(i, doc.size()); !p.empty()) return p;
      break;
    }
    if (auto p = check_text(i, open); !p.empty()) return p;
    if (doc.compare(open, 4, "<!--") == 0) {
      const std::size_t end = doc.find("-->", open);
      if (end == std::string::npos) return "unclosed comment";
      i = end + 3;
      continue;
    }
    if (doc.compare(open, 2, "<!") == 0 || doc.compare(open, 2, "<?") == 0) {
      const std::size_t end = doc.find('>', open);
      if (end == std::string::npos) return "unclosed declaration";
      i = end + 1;
      continue;
    }
    // Find the tag's end, skipping quoted attribute values.
    std::size_t j = open + 1;
    char quote = 0;
    for (; j < doc.size(); ++j) {
      if (quote) {
        if (doc[j] == quote) {
          quote = 0;
        } else if (doc[j] == '<') {
          return "raw < inside an attribute value";
        }
      } else if (doc[j] == '"' || doc[j] == '\'') {
        quote = doc[j];
      } else if (doc[j] == '>') {
        break;
      } else if (doc[j] == '<') {
        return "'<' inside a tag at " + std::to_string(j);
      }
    }
    if (j >= doc.size()) return "unterminated tag";
    std::string tag = doc.substr(open + 1, j - open - 1);
    if (auto p = check_text(open, j); !p.empty()) return p;
    i = j + 1;
    if (tag.empty()) return "empty tag";
    if (tag[0] == '/') {
      const std::string name = tag.substr(1);
      if (stack.empty() || stack.back() != name) {
        return "closing </" + name + "> does not match <" + (stack.empty() ? std::string("none") : stack.back()) + ">";
      }
      stack.pop_back();
      continue;
    }
    const bool self_closing = tag.back() == '/';
    const std::string name = tag.substr(0, tag.find_first_of(" \t\n/"));
    // Attributes: name="value" pairs.
    std::size_t a = name.size();
    while (a < tag.size()) {
      while (a < tag.size() && (tag[a] == ' ' || tag[a] == '\n' || tag[a] == '\t' || tag[a] == '/')) ++a;
      if (a >= tag.size()) break;
      const std::size_t eq = tag.find('=', a);
      if (eq == std::string::npos || (tag[eq + 1] != '"' && tag[eq + 1] != '\'')) {
        return "attribute without a quoted value in <" + tag + ">";
      }
      const std::size_t close = tag.find(tag[eq + 1], eq + 2);
      if (close == std::string::npos) return "unterminated attribute in <" + tag + ">";
      a = close + 1;
    }
    if (!self_closing) stack.push_back(name);
  }
  if (!stack.empty()) return "unclosed <" + stack.back() + ">";
  return "";
}

}  // namespace keysel::test
