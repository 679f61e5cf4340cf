#pragma once
//! @file
//! Importer (and writer) for the expert-score TSV layout of deepseek-ai/ESFT
//! (`results/expert_scores/<domain>/expert_weights_<layer>.txt`): one folder per domain, one file
//! per MoE layer numbered from 1, one line per sequence. A line holds `k × T` expert ids
//! (token-major, single tabs), a double tab, then `k × T` weights in the same order. Line i of
//! every layer file is the same sequence with the same T.

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <locus/core/atomic_file.hpp>
#include <locus/core/error.hpp>
#include <locus/trace/trace.hpp>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::trace {

//! Options of import_esft.
struct esft_options {
  std::size_t experts = 64; //!< declared routed experts; every id must be below it
  std::size_t top_k = 6;    //!< experts per token
  //! Domain folders to read, in this order (distinct plain folder names); empty: every sub-folder
  //! of the root that holds `expert_weights_<n>.txt` files, sorted by name.
  std::vector<std::string> domains;
  //! Number of layer files read per domain; 0: all of them. Either way every domain must hold
  //! `expert_weights_1.txt` ... `expert_weights_<L>.txt` without a gap, and with 0 every domain
  //! the same L.
  std::size_t layers = 0;
  //! Called after each file with (files done, files in all); may be empty.
  std::function<void(std::size_t, std::size_t)> progress;
};

//! What a folder import passed over.
struct esft_report {
  //! Sub-folders of the root that hold no `expert_weights_<n>.txt` file, so no domain was read from
  //! them (an empty domain folder, a copy that failed): the caller may say so.
  std::vector<std::string> skipped_folders;
};

//! True when `name` can be a domain folder of its own: not empty, not "." or "..", no '/' and no
//! control character (a domain name must not lead a reader or writer outside the root).
inline bool esft_domain_name_ok(std::string_view name) noexcept {
  if (name.empty() || name == "." || name == "..") return false;
  for (const char c : name)
    if (c == '/' || static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return false;
  return true;
}

//! One layer file already in memory (for importing from buffers and fuzzing).
struct esft_layer_text {
  std::string name;      //!< used in error messages, e.g. "law/expert_weights_3.txt"
  std::string_view text; //!< the file's content
};

//! One domain: its name and its layer files in layer order.
struct esft_domain_text {
  std::string name;
  std::vector<esft_layer_text> layers;
};

namespace detail::trace {

//! The parsed content of one layer file.
struct esft_layer {
  std::vector<std::uint32_t> tokens_per_line;
  std::vector<trace_expert_id> ids;
  std::vector<float> weights;
};

[[noreturn]] inline void esft_fail(const std::string& file, std::size_t line, std::size_t column,
                                   const std::string& what) {
  throw format_error(locus::detail::concat(file, ":", line, ":", column, ": ", what), line, __FILE__, __LINE__);
}

inline std::string esft_excerpt(const char* p, const char* end) {
  std::string s;
  for (; p < end && s.size() < 16 && *p != '\n'; ++p)
    s += (*p == '\t' ? ' ' : *p);
  if (s.empty()) return "end of line";
  return "\"" + s + "\"";
}

//! Parses one layer file. Hand-rolled (no streams, no allocation per value) because 37 MB of
//! text must import in well under 2 s on one core.
inline esft_layer parse_esft_lines(std::string_view text, const std::string& file, std::size_t experts, std::size_t k) {
  esft_layer out;
  out.ids.reserve(text.size() / 6);
  out.weights.reserve(text.size() / 6);
  const char* p = text.data();
  const char* const end = p + text.size();
  std::size_t line = 0;
  while (p < end) {
    ++line;
    const char* const line_begin = p;
    const char* line_end = static_cast<const char*>(std::memchr(p, '\n', static_cast<std::size_t>(end - p)));
    const char* next = line_end ? line_end + 1 : end;
    if (!line_end) line_end = end;
    if (line_end > p && line_end[-1] == '\r') --line_end;
    if (line_end == p) {
      // A blank line is tolerated only at the end of the file (a trailing newline).
      const char* q = next;
      while (q < end && (*q == '\n' || *q == '\r'))
        ++q;
      if (q != end) esft_fail(file, line, 1, "blank line; expected a sequence of expert ids");
      break;
    }
    const auto col = [&](const char* at) { return static_cast<std::size_t>(at - line_begin) + 1; };
    const std::size_t ids_before = out.ids.size();
    // Expert ids up to the double tab.
    for (;;) {
      unsigned v = 0;
      const auto r = std::from_chars(p, line_end, v);
      if (r.ec == std::errc::result_out_of_range)
        esft_fail(file, line, col(p),
                  "expert id " + esft_excerpt(p, r.ptr) + locus::detail::concat(" is out of range [0, ", experts, ")"));
      if (r.ec != std::errc{} || r.ptr == p)
        esft_fail(file, line, col(p),
                  "expected an expert id (a non-negative integer), got " + esft_excerpt(p, line_end));
      if (v >= experts)
        esft_fail(file, line, col(p), locus::detail::concat("expert id ", v, " is out of range [0, ", experts, ")"));
      out.ids.push_back(static_cast<trace_expert_id>(v));
      p = r.ptr;
      if (p == line_end)
        esft_fail(file, line, col(p), "line ends after the expert ids; expected a double tab and then the weights");
      if (*p != '\t')
        esft_fail(file, line, col(p), "expected a tab after an expert id, got " + esft_excerpt(p, line_end));
      ++p;
      if (p < line_end && *p == '\t') {
        ++p;
        break;
      }
    }
    const std::size_t n_ids = out.ids.size() - ids_before;
    const std::size_t weights_before = out.weights.size();
    for (;;) {
      float w = 0;
      const auto r = std::from_chars(p, line_end, w);
      if (r.ec == std::errc::result_out_of_range)
        esft_fail(file, line, col(p),
                  "weight " + esft_excerpt(p, r.ptr) + " is outside the range of a float (it overflows or underflows)");
      if (r.ec != std::errc{} || r.ptr == p)
        esft_fail(file, line, col(p), "expected a weight (a decimal number), got " + esft_excerpt(p, line_end));
      if (!std::isfinite(w)) esft_fail(file, line, col(p), "weight is not finite");
      if (w < 0)
        esft_fail(file, line, col(p), "weight " + esft_excerpt(p, r.ptr) + " is negative (a routing weight is >= 0)");
      out.weights.push_back(w);
      p = r.ptr;
      if (p == line_end) break;
      if (*p != '\t') esft_fail(file, line, col(p), "expected a tab after a weight, got " + esft_excerpt(p, line_end));
      ++p;
      if (p == line_end) break; // a trailing tab
    }
    const std::size_t n_w = out.weights.size() - weights_before;
    if (n_ids != n_w)
      esft_fail(file, line, 1,
                locus::detail::concat(n_ids, " expert ids but ", n_w, " weights; expected equal counts"));
    if (n_ids % k != 0)
      esft_fail(file, line, 1,
                locus::detail::concat(n_ids, " expert ids is not a multiple of top_k ", k, " (", k, " ids per token)"));
    if (n_ids / k > 0xffffffffu) esft_fail(file, line, 1, "sequence longer than 2^32-1 tokens");
    // The first id that repeats one of its token's, the line's ids read `width` per token, over the
    // tokens starting within `span` ids (npos: none).
    const auto first_repeat = [&](std::size_t width, std::size_t span) {
      const std::size_t stop = ids_before + std::min(span, n_ids) / width * width;
      for (std::size_t t = ids_before; t < stop; t += width)
        for (std::size_t j = 1; j < width; ++j)
          for (std::size_t i = 0; i < j; ++i)
            if (out.ids[t + i] == out.ids[t + j]) return t + j;
      return std::string::npos;
    };
    if (const std::size_t at = first_repeat(k, n_ids); at != std::string::npos) {
      // ESFT files do not state top-k: a line of another width read with this one straddles tokens.
      // The widths are tried on the line's first ids only, so that a long line costs no more.
      std::size_t other = 0;
      for (std::size_t w = std::min<std::size_t>(max_trace_top_k, n_ids); w > 1 && !other; --w)
        if (w != k && n_ids % w == 0 && first_repeat(w, 4096) == std::string::npos) other = w;
      esft_fail(file, line, 1,
                locus::detail::concat("token ", (at - ids_before) / k, " chooses expert ", out.ids[at], " twice",
                                      other ? locus::detail::concat(" (read with top_k ", k, "; with top_k ", other,
                                                                    " every token of the line chooses distinct "
                                                                    "experts: ESFT files do not state top-k, import "
                                                                    "it with top_k ",
                                                                    other, " (--top-k) if that is the data's)")
                                            : std::string()));
    }
    out.tokens_per_line.push_back(static_cast<std::uint32_t>(n_ids / k));
    p = next;
  }
  return out;
}

//! parse_esft_lines, naming a problem on an unterminated last line as a likely truncation.
inline esft_layer parse_esft_layer(std::string_view text, const std::string& file, std::size_t experts, std::size_t k) {
  try {
    return parse_esft_lines(text, file, experts, k);
  } catch (const format_error& e) {
    if (text.empty() || text.back() == '\n' ||
        e.offset() != static_cast<std::uint64_t>(std::count(text.begin(), text.end(), '\n')) + 1)
      throw;
    throw format_error(e.message() + " (the last line has no newline: the file looks truncated)", e.offset(), __FILE__,
                       __LINE__);
  }
}

inline std::string read_text_file(const std::filesystem::path& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f)
    throw io_error(locus::detail::concat(path.string(), ": cannot open: ", std::strerror(errno)), __FILE__, __LINE__,
                   errno);
  std::string s;
  char buf[1 << 16];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0)
    s.append(buf, n);
  const bool bad = std::ferror(f);
  const int e = errno;
  std::fclose(f);
  if (bad) throw io_error(path.string() + ": read failed: " + std::strerror(e), __FILE__, __LINE__, e);
  return s;
}

//! The layer numbers n of the `expert_weights_<n>.txt` entries in `dir`, sorted (empty when the
//! folder cannot be listed). A name that numbers a layer other than plainly 1..max_trace_layers
//! (`expert_weights_0.txt`, `_01`, `_+5`, `_5000`) is refused: it was skipped, and its layer left
//! out without a word. Other names (`expert_weights_backup.txt`) are not layer files.
//! @throws locus::invalid_input_error naming such a file
inline std::vector<std::size_t> esft_layer_numbers(const std::filesystem::path& dir) {
  std::vector<std::size_t> out;
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    constexpr std::string_view prefix = "expert_weights_", suffix = ".txt";
    if (name.size() <= prefix.size() + suffix.size() || name.compare(0, prefix.size(), prefix) != 0 ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    const std::string_view digits(name.data() + prefix.size(), name.size() - prefix.size() - suffix.size());
    std::size_t n = 0;
    const auto r = std::from_chars(digits.data(), digits.data() + digits.size(), n);
    if (r.ec != std::errc{} || r.ptr != digits.data() + digits.size() || n == 0 || n > max_trace_layers ||
        digits.front() == '0') {
      if (digits.find_first_not_of("0123456789+-") != std::string_view::npos) continue; // not a layer file
      LOCUS_THROW(invalid_input_error, (dir / name).string(), ": not a layer file this importer reads (layers are ",
                  "expert_weights_1.txt ... expert_weights_", max_trace_layers,
                  ".txt, numbered from 1 without a sign or leading zeros)");
    }
    out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

//! Appends one domain's parsed layers to the builder, checking that the layers agree.
inline void add_esft_domain(trace_builder& b, const std::string& domain, const std::vector<esft_layer>& layers,
                            const std::vector<std::string>& names, std::uint64_t& next_id) {
  const auto& first = layers.front();
  for (std::size_t l = 1; l < layers.size(); ++l) {
    const auto& cur = layers[l];
    for (std::size_t i = 0; i < std::min(first.tokens_per_line.size(), cur.tokens_per_line.size()); ++i)
      if (cur.tokens_per_line[i] != first.tokens_per_line[i])
        esft_fail(names[l], i + 1, 1,
                  locus::detail::concat(cur.tokens_per_line[i], " tokens, but ", names[0], " line ", i + 1, " has ",
                                        first.tokens_per_line[i], "; every layer must hold the same tokens"));
    if (cur.tokens_per_line.size() != first.tokens_per_line.size())
      esft_fail(names[l], std::min(cur.tokens_per_line.size(), first.tokens_per_line.size()) + 1, 1,
                locus::detail::concat(cur.tokens_per_line.size(), " sequences (lines), but ", names[0], " has ",
                                      first.tokens_per_line.size()));
  }
  const std::uint32_t d = b.domain(domain);
  const std::size_t k = b.top_k();
  const std::size_t first_token = b.tokens();
  std::size_t total = 0;
  for (auto n : first.tokens_per_line)
    total += n;
  b.reserve_tokens(total);
  for (auto n : first.tokens_per_line)
    b.add_request(next_id++, d, n);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    std::copy(layers[l].ids.begin(), layers[l].ids.end(), b.layer_ids(l).begin() + first_token * k);
    std::copy(layers[l].weights.begin(), layers[l].weights.end(), b.layer_weights(l).begin() + first_token * k);
  }
}

//! ESFT files do not state top-k: a line of top-6 data read with top_k 3 parses as twice the
//! tokens. Such a reading shows itself: every group of m = real k / top_k consecutive tokens
//! then chooses m·top_k distinct experts, which real top_k data does only by a vanishing chance.
//! Raises when every layer of `t` looks like that (the groups dividing every request) and the
//! chance of it under independent routing is below e^-30.
inline void esft_check_top_k(const locus::trace::trace& t) {
  const std::size_t k = t.top_k(), e = t.experts();
  for (std::size_t m = 2; m * k <= std::min<std::size_t>(max_trace_top_k, e); ++m) {
    bool divides = t.requests() > 0;
    for (const auto& q : t.request_table())
      divides = divides && q.length % m == 0;
    if (!divides) continue;
    const std::size_t groups = t.tokens() / m;
    // Chance that m independent uniform top-k draws are disjoint: prod over later draws of
    // C(e - j·k, k) / C(e, k) ≈ prod (1 - j·k/e)^k.
    double log_disjoint = 0;
    for (std::size_t j = 1; j < m; ++j)
      log_disjoint += static_cast<double>(k) * std::log1p(-static_cast<double>(j * k) / static_cast<double>(e));
    if (static_cast<double>(groups) * static_cast<double>(t.layers()) * log_disjoint > -30.0) continue;
    bool all_disjoint = true;
    std::vector<trace_expert_id> merged;
    for (std::size_t l = 0; l < t.layers() && all_disjoint; ++l) {
      const auto v = t.layer(l);
      for (std::size_t g = 0; g < groups && all_disjoint; ++g)
        all_disjoint = first_repeated_choice(v.ids() + g * m * k, 1, m * k) == 1;
    }
    if (all_disjoint)
      LOCUS_THROW(invalid_input_error, "ESFT: with top_k ", k, " every ", m, " consecutive tokens choose ", m * k,
                  " distinct experts in every request and layer (", groups, " groups): the data looks like top-", m * k,
                  "; import it with top_k ", m * k, " (--top-k)");
  }
}

} // namespace detail::trace

//! Imports ESFT-layout domains already in memory; every domain must have the same number of
//! layer files. Request ids run 0, 1, ... in import order.
//! @throws locus::format_error naming the file, 1-based line (also `offset()`) and column
inline trace import_esft(std::span<const esft_domain_text> domains, std::size_t experts = 64, std::size_t top_k = 6) {
  LOCUS_REQUIRE(!domains.empty(), invalid_input_error, "ESFT import: no domain given");
  const std::size_t layers = domains.front().layers.size();
  LOCUS_REQUIRE(layers > 0, invalid_input_error, "ESFT domain ", domains.front().name, " has no layer file");
  trace_builder b(experts, top_k, layers);
  std::uint64_t next_id = 0;
  for (std::size_t d = 0; d < domains.size(); ++d)
    for (std::size_t e = 0; e < d; ++e)
      LOCUS_REQUIRE(domains[d].name != domains[e].name, invalid_input_error, "ESFT domain \"", domains[d].name,
                    "\" is given twice");
  for (const auto& dom : domains) {
    LOCUS_REQUIRE(dom.layers.size() == layers, invalid_input_error, "ESFT domain ", dom.name, " has ",
                  dom.layers.size(), " layer files, domain ", domains.front().name, " has ", layers);
    std::vector<detail::trace::esft_layer> parsed;
    std::vector<std::string> names;
    for (const auto& f : dom.layers) {
      parsed.push_back(detail::trace::parse_esft_layer(f.text, f.name, experts, top_k));
      names.push_back(f.name);
    }
    if (parsed.front().tokens_per_line.empty()) detail::trace::esft_fail(names.front(), 1, 1, "file holds no sequence");
    detail::trace::add_esft_domain(b, dom.name, parsed, names, next_id);
  }
  auto t = b.build();
  detail::trace::esft_check_top_k(t);
  return t;
}

//! Imports an ESFT expert-score folder (`root_dir/<domain>/expert_weights_<n>.txt`). A folder that
//! holds `expert_weights_<n>.txt` files itself is one domain given directly: it is read as that
//! domain, named after the folder (with `opt.domains` set, it is refused: give the parent).
//! `report`, when given, lists the sub-folders read as no domain (they hold no layer file).
//! @throws locus::format_error on malformed content (file, line, column, what was expected);
//!         locus::io_error when a file cannot be read; locus::invalid_input_error when the
//!         folder holds no domain or domains disagree on the layer count
inline trace import_esft(const std::string& root_dir, const esft_options& opt = {}, esft_report* report = nullptr) {
  namespace fs = std::filesystem;
  if (report) *report = esft_report{};
  const fs::path root(root_dir);
  std::error_code ec;
  const auto status = fs::status(root, ec);
  if (status.type() == fs::file_type::not_found)
    throw io_error(root_dir + ": no such folder (expected an ESFT expert_scores folder)", __FILE__, __LINE__);
  if (ec) // e.g. a folder above it that cannot be searched
    throw io_error(root_dir + ": cannot read: " + ec.message(), __FILE__, __LINE__, ec.value());
  if (status.type() != fs::file_type::directory)
    throw io_error(root_dir + ": not a directory (expected an ESFT expert_scores folder)", __FILE__, __LINE__);
  if (!detail::trace::esft_layer_numbers(root).empty()) {
    // One domain folder given instead of its parent: read it as that one domain.
    LOCUS_REQUIRE(opt.domains.empty(), invalid_input_error, root_dir,
                  " is one domain folder (it holds expert_weights_<n>.txt files); domains are chosen among the "
                  "folders inside the parent: give the parent folder");
    fs::path dir = fs::absolute(root, ec).lexically_normal();
    if (ec) throw io_error(root_dir + ": " + ec.message(), __FILE__, __LINE__, ec.value());
    if (!dir.has_filename()) dir = dir.parent_path(); // "law/" normalises to ".../law/"
    const std::string name = dir.filename().string();
    LOCUS_REQUIRE(esft_domain_name_ok(name) && dir.has_parent_path(), invalid_input_error, root_dir,
                  " is one domain folder but its name cannot be a domain: give the parent folder");
    esft_options one = opt;
    one.domains = {name};
    return import_esft(dir.parent_path().string(), one); // one domain named: nothing is skipped
  }
  std::vector<std::string> domains = opt.domains;
  if (domains.empty()) {
    // Every sub-folder that holds any layer file is a domain; one without layer 1 is an error below,
    // not a folder silently skipped.
    fs::directory_iterator it(root, ec), end;
    for (; !ec && it != end; it.increment(ec)) {
      std::error_code e2;
      if (!it->is_directory(e2)) continue;
      if (!detail::trace::esft_layer_numbers(it->path()).empty())
        domains.push_back(it->path().filename().string());
      else if (report)
        report->skipped_folders.push_back(it->path().string());
    }
    if (ec) throw io_error(root_dir + ": cannot list the folder: " + ec.message(), __FILE__, __LINE__, ec.value());
    std::sort(domains.begin(), domains.end());
    if (report) std::sort(report->skipped_folders.begin(), report->skipped_folders.end());
  }
  LOCUS_REQUIRE(!domains.empty(), invalid_input_error, root_dir,
                " holds no domain folder with expert_weights_<n>.txt files");
  for (std::size_t d = 0; d < domains.size(); ++d) {
    LOCUS_REQUIRE(
        esft_domain_name_ok(domains[d]), invalid_input_error, "ESFT domain \"", domains[d],
        "\" is not a folder name inside the root (empty, \".\", \"..\", or holds '/' or a control character)");
    for (std::size_t e = 0; e < d; ++e)
      LOCUS_REQUIRE(domains[d] != domains[e], invalid_input_error, "ESFT domain \"", domains[d], "\" is given twice");
  }
  // Every domain must hold layer files 1..L without a gap, and all domains the same L (a gap in the
  // first domain used to cut every domain short).
  std::size_t layers = opt.layers;
  std::string layers_from;
  for (const auto& dom : domains) {
    const fs::path dir = root / dom;
    if (!fs::is_directory(dir, ec)) {
      // The domains the root does hold, so that a misspelled one can be told from a missing one.
      std::vector<std::string> there;
      std::error_code le;
      for (fs::directory_iterator it(root, le), end; !le && it != end; it.increment(le)) {
        std::error_code de;
        if (it->is_directory(de) && !detail::trace::esft_layer_numbers(it->path()).empty())
          there.push_back(it->path().filename().string());
      }
      std::sort(there.begin(), there.end());
      std::string listed;
      for (std::size_t i = 0; i < there.size() && i < 20; ++i)
        listed += (i ? ", " : "") + there[i];
      if (there.size() > 20) listed += ", ...";
      throw io_error(dir.string() + ": no such domain folder" +
                         (there.empty() ? std::string(" (the root holds none)") : " (the root holds " + listed + ")"),
                     __FILE__, __LINE__, ENOENT);
    }
    const auto numbers = detail::trace::esft_layer_numbers(dir);
    if (numbers.empty())
      throw io_error(dir.string() + ": holds no expert_weights_<n>.txt layer file", __FILE__, __LINE__, ENOENT);
    for (std::size_t i = 0; i < numbers.size(); ++i)
      if (numbers[i] != i + 1)
        throw io_error(locus::detail::concat((dir / ("expert_weights_" + std::to_string(i + 1) + ".txt")).string(),
                                             ": missing, but expert_weights_", numbers[i],
                                             ".txt exists (layer files must be numbered 1, 2, ... without a gap)"),
                       __FILE__, __LINE__, ENOENT);
    if (opt.layers != 0) {
      if (numbers.size() < opt.layers)
        throw io_error(locus::detail::concat(dir.string(), ": has ", numbers.size(), " layer files, ", opt.layers,
                                             " were asked for"),
                       __FILE__, __LINE__, ENOENT);
    } else if (layers == 0) {
      layers = numbers.size();
      layers_from = dom;
    } else if (numbers.size() < layers) {
      throw io_error(
          locus::detail::concat((dir / ("expert_weights_" + std::to_string(numbers.size() + 1) + ".txt")).string(),
                                ": missing (domain ", dom, " has ", numbers.size(), " layer files, domain ",
                                layers_from, " has ", layers, "; every domain must have the same layers)"),
          __FILE__, __LINE__, ENOENT);
    } else if (numbers.size() > layers) {
      throw io_error(locus::detail::concat(dir.string(), ": has ", numbers.size(), " layer files, domain ", layers_from,
                                           " has ", layers, " (every domain must have the same layers)"),
                     __FILE__, __LINE__, ENOENT);
    }
  }
  trace_builder b(opt.experts, opt.top_k, layers);
  std::uint64_t next_id = 0;
  std::size_t done = 0;
  for (const auto& dom : domains) {
    std::vector<detail::trace::esft_layer> parsed;
    std::vector<std::string> names;
    for (std::size_t l = 0; l < layers; ++l) {
      const fs::path file = root / dom / ("expert_weights_" + std::to_string(l + 1) + ".txt");
      if (!fs::is_regular_file(file, ec))
        throw io_error(file.string() + (fs::is_directory(file, ec) ? ": is a folder, expected a layer file"
                                                                   : ": not a regular file, expected a layer file"),
                       __FILE__, __LINE__, EISDIR);
      const std::string text = detail::trace::read_text_file(file);
      names.push_back(file.string());
      parsed.push_back(detail::trace::parse_esft_layer(text, names.back(), opt.experts, opt.top_k));
      if (opt.progress) opt.progress(++done, layers * domains.size());
    }
    if (parsed.front().tokens_per_line.empty()) detail::trace::esft_fail(names.front(), 1, 1, "file holds no sequence");
    detail::trace::add_esft_domain(b, dom, parsed, names, next_id);
  }
  // expert_weights_<n> is the model's hidden layer n (ESFT's layer 0 is dense and not logged):
  // the trace keeps that numbering, so an engine export lines the layers up without being told.
  std::vector<std::uint32_t> model_layers(layers);
  for (std::size_t l = 0; l < layers; ++l)
    model_layers[l] = static_cast<std::uint32_t>(l + 1);
  b.set_model_layers(std::move(model_layers));
  auto t = b.build();
  detail::trace::esft_check_top_k(t);
  return t;
}

//! The text of layer `l` of domain `domain` in the ESFT layout (weights printed in their shortest
//! round-trip form, so import(write(t)) reproduces `t`'s ids and weights exactly).
inline std::string format_esft_layer(const trace& t, std::uint32_t domain, std::size_t l) {
  std::string s;
  const auto v = t.layer(l);
  const std::size_t k = t.top_k();
  char buf[32];
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto& q = t.request(r);
    if (q.domain != domain) continue;
    const std::size_t b = q.first_token * k, e = (q.first_token + q.length) * k;
    for (std::size_t i = b; i < e; ++i) {
      s += std::to_string(v.ids()[i]);
      s += '\t';
    }
    for (std::size_t i = b; i < e; ++i) {
      s += '\t';
      const auto res = std::to_chars(buf, buf + sizeof buf, v.weights()[i]);
      s.append(buf, res.ptr);
    }
    s += '\n';
  }
  return s;
}

//! Writes `t` in the ESFT layout under `root_dir` (one folder per domain that has requests).
//! @throws locus::io_error when a file cannot be written
inline void write_esft(const trace& t, const std::string& root_dir) {
  namespace fs = std::filesystem;
  for (std::uint32_t d = 0; d < t.domains().size(); ++d) {
    bool any = false;
    for (const auto& q : t.request_table())
      any = any || q.domain == d;
    if (!any) continue;
    const std::string& name = t.domains()[d];
    LOCUS_REQUIRE(esft_domain_name_ok(name), invalid_input_error, "write_esft: domain name \"", name,
                  "\" cannot be a folder name (empty, \".\", \"..\", or holds '/' or a control character)");
    const fs::path dir = fs::path(root_dir) / name;
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec)
      throw io_error(dir.string() + ": cannot create the folder: " + ec.message(), __FILE__, __LINE__, ec.value());
    for (std::size_t l = 0; l < t.layers(); ++l) {
      const fs::path file = dir / ("expert_weights_" + std::to_string(l + 1) + ".txt");
      const std::string text = format_esft_layer(t, d, l);
      write_file_atomically(file.string(), text);
    }
  }
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::trace
