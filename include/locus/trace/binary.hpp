#pragma once
//! @file
//! The locus binary trace format, versions 1 to 3 (specified in docs/trace-format.md): an 80-byte
//! header (magic, version, shape, counts, payload size, payload checksum, the model's hidden-layer
//! count from version 2 and which optional sections follow in version 3, header checksum), then
//! the domain table, the model layer id of each traced layer (version 2; version 3 when its flag
//! says so), the request names (version 3, when its flag says so), request table, token phases,
//! token steps and one (ids, weights) block pair per layer, every section 8-byte aligned, all
//! integers little-endian. The writer writes the lowest version that holds the trace, so every
//! file has one encoding.
//!
//! The reader streams the file in chunks straight into the trace's arrays, hashing and
//! validating each chunk while it is in cache. Every inconsistency — truncation, bad magic or
//! version, a checksum mismatch, an id out of range, a NaN weight, counts that disagree — raises
//! `locus::format_error` whose `offset()` is the byte offset of the offending field.

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <locus/core/atomic_file.hpp>
#include <locus/core/error.hpp>
#include <locus/trace/trace.hpp>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::trace {

static_assert(std::endian::native == std::endian::little,
              "locus: the binary trace format is little-endian and this reader does not byte-swap");

//! Magic bytes at offset 0.
inline constexpr std::array<char, 8> binary_magic = {'L', 'O', 'C', 'U', 'S', 'T', 'R', 'C'};
//! The newest version this code writes and reads (it reads versions 1 and 2 too).
inline constexpr std::uint32_t binary_version = 3;
//! Size of the fixed header.
inline constexpr std::size_t binary_header_bytes = 80;
//! Version 3's flags, above the hidden-layer count in the header's field at offset 64.
inline constexpr std::uint64_t binary_has_layer_table = std::uint64_t{1} << 32;
inline constexpr std::uint64_t binary_has_request_names = std::uint64_t{1} << 33;
//! Longest domain name the format accepts (bounds allocations driven by a corrupt file).
inline constexpr std::size_t binary_max_domain_name = max_trace_domain_name;

//! A 64-bit checksum of a byte stream, computed incrementally (the format's checksum; defined
//! bit-for-bit in docs/trace-format.md). Four independent 64-bit lanes consume 32-byte blocks so
//! that it runs at several GB/s, far above page-cache read speed.
class checksum64 {
public:
  static constexpr std::uint64_t m1 = 0x9e3779b97f4a7c15ull;
  static constexpr std::uint64_t m2 = 0xbf58476d1ce4e5b9ull;
  static constexpr std::uint64_t m3 = 0x94d049bb133111ebull;

  void update(const void* data, std::size_t n) noexcept {
    if (n == 0) return; // an empty section may come with a null pointer, which memcpy must not see
    auto p = static_cast<const unsigned char*>(data);
    total_ += n;
    if (fill_ > 0) {
      const std::size_t take = std::min(n, sizeof buf_ - fill_);
      std::memcpy(buf_ + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ < sizeof buf_) return;
      block(buf_);
      fill_ = 0;
    }
    for (; n >= 32; n -= 32, p += 32)
      block(p);
    std::memcpy(buf_, p, n);
    fill_ = n;
  }

  std::uint64_t digest() const noexcept {
    std::uint64_t l[4] = {lane_[0], lane_[1], lane_[2], lane_[3]};
    // The partial block is zero-padded and mixed in; the total length disambiguates padding.
    if (fill_ > 0) {
      unsigned char last[32] = {};
      std::memcpy(last, buf_, fill_);
      for (int i = 0; i < 4; ++i)
        l[i] = round(l[i], load(last + 8 * i));
    }
    std::uint64_t h = std::rotl(l[0], 1) + std::rotl(l[1], 7) + std::rotl(l[2], 12) + std::rotl(l[3], 18);
    h ^= total_ * m1;
    h = (h ^ (h >> 30)) * m2;
    h = (h ^ (h >> 27)) * m3;
    return h ^ (h >> 31);
  }

  //! Checksum of one buffer.
  static std::uint64_t of(const void* data, std::size_t n) noexcept {
    checksum64 c;
    c.update(data, n);
    return c.digest();
  }

private:
  static std::uint64_t load(const unsigned char* p) noexcept {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
  }
  static std::uint64_t round(std::uint64_t lane, std::uint64_t w) noexcept {
    return std::rotl(lane ^ (w * m2), 29) * m1;
  }
  void block(const unsigned char* p) noexcept {
    for (int i = 0; i < 4; ++i)
      lane_[i] = round(lane_[i], load(p + 8 * i));
  }

  std::uint64_t lane_[4] = {m1, m2, m3, m1 ^ m2};
  std::uint64_t total_ = 0;
  unsigned char buf_[32] = {};
  std::size_t fill_ = 0;
};

namespace detail::trace {

//! Fixed header fields at their offsets (docs/trace-format.md).
struct header_fields {
  std::uint32_t version = 0, header_bytes = 0, experts = 0, top_k = 0, layers = 0, domains = 0;
  std::uint64_t requests = 0, tokens = 0, payload_bytes = 0, payload_checksum = 0, reserved = 0, header_checksum = 0;
};

inline constexpr std::size_t align8(std::size_t n) noexcept { return (n + 7) & ~std::size_t{7}; }

template <class T>
void put(unsigned char* p, T v) noexcept {
  std::memcpy(p, &v, sizeof v);
}
template <class T>
T get(const unsigned char* p) noexcept {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

//! Size of the payload for the given counts; false on overflow of 64 bits.
inline bool payload_size(std::uint64_t domain_bytes, std::uint64_t requests, std::uint64_t tokens, std::uint64_t k,
                         std::uint64_t layers, std::uint64_t& out, bool layer_table = false,
                         std::uint64_t name_bytes = 0) noexcept {
  std::uint64_t rows = 0, ids = 0, w = 0, per_layer = 0, all_layers = 0, req = 0, steps = 0;
  if (__builtin_mul_overflow(tokens, k, &rows) || __builtin_mul_overflow(rows, 2u, &ids) ||
      __builtin_mul_overflow(rows, 4u, &w) || __builtin_mul_overflow(requests, 16u, &req) ||
      __builtin_mul_overflow(tokens, 4u, &steps))
    return false;
  if (ids > (1ull << 62) || w > (1ull << 62) || tokens > (1ull << 60) || domain_bytes > (1ull << 40)) return false;
  per_layer = align8(ids) + align8(w);
  if (__builtin_mul_overflow(per_layer, layers, &all_layers)) return false;
  std::uint64_t total = align8(domain_bytes);
  if (layer_table && (layers > (1ull << 32) || __builtin_add_overflow(total, align8(4 * layers), &total))) return false;
  if (name_bytes > (1ull << 60) || __builtin_add_overflow(total, align8(name_bytes), &total)) return false;
  if (__builtin_add_overflow(total, req, &total) || __builtin_add_overflow(total, align8(tokens), &total) ||
      __builtin_add_overflow(total, align8(steps), &total) || __builtin_add_overflow(total, all_layers, &total))
    return false;
  out = total;
  return true;
}

//! Reads from a memory buffer.
class memory_source {
public:
  memory_source(std::span<const std::byte> bytes, std::string name) : bytes_(bytes), name_(std::move(name)) {}
  std::uint64_t size() const noexcept { return bytes_.size(); }
  std::uint64_t offset() const noexcept { return offset_; }
  const std::string& name() const noexcept { return name_; }
  //! Copies up to n bytes; returns how many were available.
  std::size_t read(void* dst, std::size_t n) {
    if (n == 0) return 0; // empty sections may pass a null pointer
    const std::size_t take = std::min<std::uint64_t>(n, bytes_.size() - offset_);
    if (take == 0) return 0; // an empty span may have a null data(), which memcpy must not see
    std::memcpy(dst, bytes_.data() + offset_, take);
    offset_ += take;
    return take;
  }

private:
  std::span<const std::byte> bytes_;
  std::uint64_t offset_ = 0;
  std::string name_;
};

//! Reads a file with stdio in large chunks (page-cache reads run at memory speed).
class file_source {
public:
  explicit file_source(const std::string& path) : name_(path) {
    f_ = std::fopen(path.c_str(), "rb");
    if (!f_)
      throw io_error(locus::detail::concat(path, ": cannot open: ", std::strerror(errno)), __FILE__, __LINE__, errno);
    std::setvbuf(f_, nullptr, _IONBF, 0); // reads are large; stdio's buffer would only add a copy
    // A pipe (a FIFO, a shell's <(...)) has no size to check the header against.
    if (std::fseek(f_, 0, SEEK_END) != 0) {
      const int e = errno;
      std::fclose(f_);
      throw io_error(locus::detail::concat(path, ": cannot read a binary trace from it: ", std::strerror(e),
                                           (e == ESPIPE ? " (a pipe; give it on standard input instead, as -)" : "")),
                     __FILE__, __LINE__, e);
    }
    const long s = std::ftell(f_);
    if (s < 0) {
      const int e = errno;
      std::fclose(f_); // no destructor runs for a constructor that throws
      throw io_error(locus::detail::concat(path, ": cannot tell its size: ", std::strerror(e)), __FILE__, __LINE__, e);
    }
    size_ = static_cast<std::uint64_t>(s);
    std::rewind(f_);
  }
  file_source(const file_source&) = delete;
  file_source& operator=(const file_source&) = delete;
  ~file_source() { std::fclose(f_); }
  std::uint64_t size() const noexcept { return size_; }
  std::uint64_t offset() const noexcept { return offset_; }
  const std::string& name() const noexcept { return name_; }
  std::size_t read(void* dst, std::size_t n) {
    if (n == 0) return 0; // empty sections may pass a null pointer
    const std::size_t got = std::fread(dst, 1, n, f_);
    if (got < n && std::ferror(f_)) fail("read failed");
    offset_ += got;
    return got;
  }

private:
  [[noreturn]] void fail(const char* what) {
    const int e = errno;
    throw io_error(locus::detail::concat(name_, ": ", what, ": ", std::strerror(e)), __FILE__, __LINE__, e);
  }
  std::FILE* f_ = nullptr;
  std::uint64_t size_ = 0;
  std::uint64_t offset_ = 0;
  std::string name_;
};

[[noreturn]] inline void format_fail(const std::string& name, std::uint64_t offset, const std::string& what) {
  throw format_error(locus::detail::concat(name, ": offset ", offset, ": ", what), offset, __FILE__, __LINE__);
}

//! Streams sections: reads exactly, hashes, and names the section on truncation.
template <class Source>
class section_reader {
public:
  explicit section_reader(Source& src) : src_(src) {}
  void read(void* dst, std::size_t n, const char* what) {
    const std::uint64_t at = src_.offset();
    const std::size_t got = src_.read(dst, n);
    if (got != n)
      format_fail(src_.name(), at + got,
                  locus::detail::concat("file ends inside ", what, ": expected ", n, " bytes at offset ", at, ", got ",
                                        got, " (the file looks truncated)"));
    hash_.update(dst, n);
  }
  //! Reads the zero padding up to the next multiple of 8.
  void pad(const char* what) {
    const std::size_t n = align8(src_.offset()) - src_.offset();
    if (n == 0) return;
    unsigned char z[8];
    const std::uint64_t at = src_.offset();
    read(z, n, what);
    for (std::size_t i = 0; i < n; ++i)
      if (z[i] != 0)
        format_fail(src_.name(), at + i,
                    locus::detail::concat("padding byte after ", what, " is ", int(z[i]), ", expected 0"));
  }
  std::uint64_t offset() const noexcept { return src_.offset(); }
  std::uint64_t remaining() const noexcept { return src_.size() - src_.offset(); }
  std::uint64_t digest() const noexcept { return hash_.digest(); }
  const std::string& name() const noexcept { return src_.name(); }

private:
  Source& src_;
  checksum64 hash_;
};

template <class Source>
header_fields read_header(Source& src) {
  unsigned char h[binary_header_bytes];
  const std::size_t got = src.read(h, sizeof h);
  if (got < 8)
    format_fail(src.name(), got,
                locus::detail::concat("file ends inside the magic: expected ", binary_header_bytes,
                                      "-byte header starting with \"LOCUSTRC\", got ", got, " bytes"));
  if (std::memcmp(h, binary_magic.data(), 8) != 0)
    format_fail(src.name(), 0,
                "bad magic: expected \"LOCUSTRC\" (not a locus binary trace; `locus trace import` converts route "
                "JSONL logs and ESFT folders into one)");
  if (got < 12)
    format_fail(
        src.name(), got,
        locus::detail::concat("file ends inside the header: expected ", binary_header_bytes, " bytes, got ", got));
  header_fields f;
  f.version = get<std::uint32_t>(h + 8);
  if (f.version < 1 || f.version > binary_version)
    format_fail(
        src.name(), 8,
        locus::detail::concat("unsupported version ", f.version, ", this reader reads versions 1 to ", binary_version));
  if (got < binary_header_bytes)
    format_fail(
        src.name(), got,
        locus::detail::concat("file ends inside the header: expected ", binary_header_bytes, " bytes, got ", got));
  f.header_bytes = get<std::uint32_t>(h + 12);
  f.experts = get<std::uint32_t>(h + 16);
  f.top_k = get<std::uint32_t>(h + 20);
  f.layers = get<std::uint32_t>(h + 24);
  f.domains = get<std::uint32_t>(h + 28);
  f.requests = get<std::uint64_t>(h + 32);
  f.tokens = get<std::uint64_t>(h + 40);
  f.payload_bytes = get<std::uint64_t>(h + 48);
  f.payload_checksum = get<std::uint64_t>(h + 56);
  f.reserved = get<std::uint64_t>(h + 64);
  f.header_checksum = get<std::uint64_t>(h + 72);
  const std::uint64_t hc = checksum64::of(h, 72);
  if (hc != f.header_checksum)
    format_fail(src.name(), 72,
                locus::detail::concat("header checksum mismatch: stored ", f.header_checksum, ", computed ", hc,
                                      " (the header is corrupted)"));
  if (f.header_bytes != binary_header_bytes)
    format_fail(src.name(), 12,
                locus::detail::concat("header size ", f.header_bytes, ", expected ", binary_header_bytes));
  if (f.experts < 1 || f.experts > max_trace_experts)
    format_fail(src.name(), 16, locus::detail::concat("experts is ", f.experts, ", expected 1..", max_trace_experts));
  if (f.top_k < 1 || f.top_k > max_trace_top_k || f.top_k > f.experts)
    format_fail(src.name(), 20,
                locus::detail::concat("top_k is ", f.top_k, ", expected 1..",
                                      std::min<std::size_t>(max_trace_top_k, f.experts)));
  if (f.layers < 1 || f.layers > max_trace_layers)
    format_fail(src.name(), 24, locus::detail::concat("layers is ", f.layers, ", expected 1..", max_trace_layers));
  if (f.domains > max_trace_domains)
    format_fail(src.name(), 28,
                locus::detail::concat("domains is ", f.domains, ", expected at most ", max_trace_domains));
  // Versions 2 and 3 store the model's hidden-layer count here; version 1 reserves it.
  if (f.version == 1 && f.reserved != 0) format_fail(src.name(), 64, "reserved field is not 0");
  if (f.version == 2 && f.reserved > 0xffffffffull)
    format_fail(src.name(), 64, locus::detail::concat("hidden layer count ", f.reserved, " is too large"));
  if (f.version == 3) {
    const std::uint64_t flags = f.reserved >> 32 << 32;
    if (flags & ~(binary_has_layer_table | binary_has_request_names))
      format_fail(src.name(), 64,
                  locus::detail::concat("unknown section flags ", flags >> 32, " (this reader knows 1 and 2)"));
    // One encoding per trace: what versions 1 and 2 hold is written as them.
    if (!(flags & binary_has_request_names) && ((flags & binary_has_layer_table) || (f.reserved & 0xffffffffull) == 0))
      format_fail(src.name(), 64,
                  "version 3 without request names holds only a hidden-layer count without layer ids (other "
                  "traces are written as version 1 or 2)");
  }
  if (f.tokens < f.requests)
    format_fail(
        src.name(), 40,
        locus::detail::concat(f.tokens, " tokens for ", f.requests, " requests: every request has at least one token"));
  const std::uint64_t available = src.size() - binary_header_bytes;
  if (f.payload_bytes != available)
    format_fail(src.name(), 48,
                locus::detail::concat(
                    "payload size is ", f.payload_bytes, " bytes but the file holds ", available,
                    " bytes after the header (",
                    available < f.payload_bytes ? "the file looks truncated" : "the file has extra bytes", ")"));
  return f;
}

//! `count` names, each a `u32` length (`shortest` .. `longest`) and its bytes, as the domain table
//! and the request names hold them; adds their bytes to `bytes`. The caller has bounded `count` by
//! the payload; a length past the file's end is refused before anything of it is allocated.
template <class Source>
std::vector<std::string> read_names(section_reader<Source>& in, std::uint64_t count, const char* what,
                                    std::uint32_t shortest, std::size_t longest, const char* section,
                                    std::uint64_t& bytes) {
  std::vector<std::string> out; // grown as read, not reserved: `count` may be a corrupt file's claim
  for (std::uint64_t i = 0; i < count; ++i) {
    const std::uint64_t at = in.offset();
    std::uint32_t len = 0;
    in.read(&len, 4, section);
    if (len < shortest || len > longest)
      format_fail(
          in.name(), at,
          shortest ? locus::detail::concat(what, " ", i, " name length ", len, ", expected ", shortest, "..", longest)
                   : locus::detail::concat(what, " ", i, " name length ", len, ", expected at most ", longest));
    if (len > in.remaining())
      format_fail(in.name(), at,
                  locus::detail::concat(what, " ", i, " name length ", len, " runs past the end of the file (",
                                        in.remaining(), " bytes left; the file looks truncated)"));
    std::string s(len, '\0');
    in.read(s.data(), len, section);
    out.push_back(std::move(s));
    bytes += 4 + len;
  }
  return out;
}

template <class Source>
locus::trace::trace read(Source& src) {
  const header_fields f = read_header(src);
  const std::string& name = src.name();
  section_reader<Source> in(src);

  // Domain table: bounded by the payload size before anything is allocated.
  std::vector<std::string> domains;
  std::uint64_t domain_bytes = 0;
  if (f.domains > f.payload_bytes / 4)
    format_fail(name, 28,
                locus::detail::concat(f.domains, " domains cannot fit in a ", f.payload_bytes, "-byte payload"));
  domains = read_names(in, f.domains, "domain", 0, binary_max_domain_name, "the domain table", domain_bytes);
  if (const std::size_t d = trace_builder::first_repeated_domain(domains); d < domains.size())
    format_fail(name, 80,
                locus::detail::concat("domain ", d, " \"", domains[d],
                                      "\" repeats an earlier domain name (names must be distinct)"));
  in.pad("the domain table");
  std::vector<std::uint32_t> model_layers;
  const bool layer_table = f.version == 2 || (f.version == 3 && (f.reserved & binary_has_layer_table));
  const bool request_names = f.version == 3 && (f.reserved & binary_has_request_names);
  if (layer_table) {
    if (f.layers > f.payload_bytes / 4)
      format_fail(name, 24,
                  locus::detail::concat(f.layers, " layers cannot fit in a ", f.payload_bytes, "-byte payload"));
    model_layers.resize(f.layers);
    const std::uint64_t at = in.offset();
    in.read(model_layers.data(), 4 * model_layers.size(), "the layer table");
    for (std::size_t l = 0; l < model_layers.size(); ++l) {
      if (l > 0 && model_layers[l] <= model_layers[l - 1])
        format_fail(name, at + 4 * l,
                    locus::detail::concat("layer ", l, " is model layer ", model_layers[l],
                                          ", expected more than layer ", l - 1, "'s ", model_layers[l - 1]));
      if (f.reserved != 0 && model_layers[l] >= f.reserved)
        format_fail(name, at + 4 * l,
                    locus::detail::concat("layer ", l, " is model layer ", model_layers[l], ", expected < ", f.reserved,
                                          " hidden layers"));
    }
    in.pad("the layer table");
  }
  // Request names (version 3): bounded by the payload size before anything is allocated.
  std::vector<std::string> names;
  std::uint64_t name_bytes = 0;
  if (request_names) {
    if (f.requests > f.payload_bytes / 4)
      format_fail(
          name, 32,
          locus::detail::concat(f.requests, " request names cannot fit in a ", f.payload_bytes, "-byte payload"));
    names = read_names(in, f.requests, "request", 1, max_trace_request_name, "the request names", name_bytes);
    in.pad("the request names");
  }
  std::uint64_t expected = 0;
  if (!payload_size(domain_bytes, f.requests, f.tokens, f.top_k, f.layers, expected, layer_table, name_bytes) ||
      expected != f.payload_bytes)
    format_fail(name, 48,
                locus::detail::concat("payload size ", f.payload_bytes, " does not match the counts (", f.requests,
                                      " requests, ", f.tokens, " tokens, ", f.layers, " layers, top_k ", f.top_k, ")"));

  trace_builder b(f.experts, f.top_k, f.layers);
  b.set_domains(std::move(domains));
  if (f.version >= 2)
    b.set_model_layers(std::move(model_layers), static_cast<std::uint32_t>(f.reserved & 0xffffffffull));
  b.reserve_tokens(f.tokens);
  const std::uint64_t requests_at = in.offset();
  std::uint64_t tokens = 0;
  {
    std::vector<unsigned char> table(f.requests * 16);
    in.read(table.data(), table.size(), "the request table");
    for (std::uint64_t r = 0; r < f.requests; ++r) {
      const unsigned char* e = table.data() + 16 * r;
      const auto id = get<std::uint64_t>(e);
      const auto dom = get<std::uint32_t>(e + 8);
      const auto len = get<std::uint32_t>(e + 12);
      const std::uint64_t at = requests_at + 16 * r;
      if (dom >= f.domains)
        format_fail(name, at + 8,
                    locus::detail::concat("request ", r, " has domain ", dom, ", expected < ", f.domains));
      if (len == 0 || tokens + len > f.tokens)
        format_fail(name, at + 12,
                    locus::detail::concat("request ", r, " has length ", len, "; the header declares ", f.tokens,
                                          " tokens and earlier requests hold ", tokens));
      tokens += len;
      b.add_request(id, dom, len, names.empty() ? std::string_view() : std::string_view(names[r]));
    }
  }
  if (tokens != f.tokens)
    format_fail(name, 40,
                locus::detail::concat("the requests hold ", tokens, " tokens, the header declares ", f.tokens));

  const std::uint64_t phases_at = in.offset();
  auto ph = b.token_phases();
  in.read(ph.data(), ph.size(), "the token phases");
  for (std::size_t t = 0; t < ph.size(); ++t)
    if (static_cast<std::uint8_t>(ph[t]) > 2)
      format_fail(name, phases_at + t,
                  locus::detail::concat("token ", t, " has phase ", int(ph[t]),
                                        ", expected 0 (prefill), 1 (decode) or 2 (unknown)"));
  in.pad("the token phases");
  const std::uint64_t steps_at = in.offset();
  auto st = b.token_steps();
  in.read(st.data(), st.size() * 4, "the token steps");
  for (std::size_t t = 0; t < st.size(); ++t)
    if (st[t] < -1)
      format_fail(name, steps_at + 4 * t,
                  locus::detail::concat("token ", t, " has decode step ", st[t], ", expected -1 (unknown) or more"));
  in.pad("the token steps");

  // Layer blocks in chunks that stay in L2 while they are hashed and validated.
  constexpr std::size_t chunk = std::size_t{1} << 18;
  // The first weight that is not one (NaN, infinite, negative), reported after the checksum: a
  // flipped bit is more often a sign or exponent bit of a weight than anything else, and its
  // damage is best named as damage.
  std::uint64_t bad_weight_at = 0;
  std::string bad_weight;
  for (std::size_t l = 0; l < f.layers; ++l) {
    auto ids = b.layer_ids(l);
    const std::size_t id_chunk = chunk / f.top_k * f.top_k; // whole tokens, for the repeated-choice check
    for (std::size_t i = 0; i < ids.size(); i += id_chunk) {
      const std::size_t n = std::min(id_chunk, ids.size() - i);
      const std::uint64_t at = in.offset();
      in.read(ids.data() + i, n * 2, "a layer's expert ids");
      if (!trace_builder::ids_in_range(ids.data() + i, n, f.experts))
        for (std::size_t j = 0; j < n; ++j)
          if (ids[i + j] >= f.experts)
            format_fail(name, at + 2 * j,
                        locus::detail::concat("layer ", l, " token ", (i + j) / f.top_k, " choice ", (i + j) % f.top_k,
                                              ": expert id ", ids[i + j], " is out of range [0, ", f.experts, ")"));
      const std::size_t k = f.top_k, t0 = i / k, t1 = (i + n) / k;
      if (const std::size_t t = t0 + first_repeated_choice(ids.data() + t0 * k, t1 - t0, k); t < t1) {
        const std::size_t j = repeated_choice(ids.data() + t * k, k);
        format_fail(name, at + 2 * (t * k + j - i),
                    locus::detail::concat("layer ", l, " token ", t, " choice ", j, ": expert ", ids[t * k + j],
                                          " is chosen twice (a token's top-k experts "
                                          "must be distinct)"));
      }
    }
    in.pad("a layer's expert ids");
    auto w = b.layer_weights(l);
    for (std::size_t i = 0; i < w.size(); i += chunk) {
      const std::size_t n = std::min(chunk, w.size() - i);
      const std::uint64_t at = in.offset();
      in.read(w.data() + i, n * 4, "a layer's weights");
      if (bad_weight.empty() && !trace_builder::weights_valid(w.data() + i, n))
        for (std::size_t j = 0; j < n && bad_weight.empty(); ++j)
          if (!trace_builder::weight_valid(w[i + j])) {
            bad_weight_at = at + 4 * j;
            bad_weight = locus::detail::concat(
                "layer ", l, " token ", (i + j) / f.top_k, " choice ", (i + j) % f.top_k, ": weight ", w[i + j],
                std::isfinite(w[i + j]) ? " is negative (a routing weight is >= 0)" : " is not finite");
          }
    }
    in.pad("a layer's weights");
  }
  const std::uint64_t pc = in.digest();
  if (pc != f.payload_checksum)
    format_fail(name, 56,
                locus::detail::concat("payload checksum mismatch: stored ", f.payload_checksum, ", computed ", pc,
                                      " (the payload is corrupted)"));
  if (!bad_weight.empty()) format_fail(name, bad_weight_at, bad_weight);
  // Every id, weight, phase and step was validated on the way in (the same checks as build()).
  return b.build(trace_builder::already_validated_t{});
}

//! Writes sections, hashing the payload; the header is written last.
template <class Sink>
void write(const locus::trace::trace& t, Sink& sink) {
  checksum64 hash;
  std::uint64_t written = 0;
  auto emit = [&](const void* p, std::size_t n) {
    sink.write(p, n);
    hash.update(p, n);
    written += n;
  };
  auto pad = [&] {
    static constexpr unsigned char zero[8] = {};
    const std::size_t n = align8(binary_header_bytes + written) - (binary_header_bytes + written);
    if (n) emit(zero, n);
  };
  for (const auto& d : t.domains()) {
    LOCUS_REQUIRE(d.size() <= binary_max_domain_name, invalid_input_error, "write_trace: domain name of ", d.size(),
                  " bytes exceeds ", binary_max_domain_name);
    const auto len = static_cast<std::uint32_t>(d.size());
    emit(&len, 4);
    emit(d.data(), d.size());
  }
  pad();
  // The lowest version that holds the trace: 1 without layer information or names, 2 with layer
  // ids, 3 with names or a hidden-layer count alone (version 2 would add identity layer ids).
  const bool v3 = t.has_request_names() || (t.hidden_layers() > 0 && !t.has_model_layers());
  const bool layer_table = t.has_model_layers();
  const std::uint32_t version = v3 ? 3 : layer_table ? 2 : 1;
  if (layer_table) {
    for (std::size_t l = 0; l < t.layers(); ++l) {
      const auto id = static_cast<std::uint32_t>(t.model_layer(l));
      emit(&id, 4);
    }
    pad();
  }
  if (t.has_request_names()) {
    for (std::size_t r = 0; r < t.requests(); ++r) {
      const auto& n = t.request_name(r);
      const auto len = static_cast<std::uint32_t>(n.size());
      emit(&len, 4);
      emit(n.data(), n.size());
    }
    pad();
  }
  std::vector<unsigned char> table(t.requests() * 16);
  for (std::size_t r = 0; r < t.requests(); ++r) {
    const auto& q = t.request(r);
    put(table.data() + 16 * r, q.id);
    put(table.data() + 16 * r + 8, q.domain);
    put(table.data() + 16 * r + 12, q.length);
  }
  emit(table.data(), table.size());
  emit(t.phases().data(), t.phases().size());
  pad();
  emit(t.steps().data(), t.steps().size() * 4);
  pad();
  for (std::size_t l = 0; l < t.layers(); ++l) {
    const auto v = t.layer(l);
    emit(v.ids(), v.tokens() * v.top_k() * 2);
    pad();
    emit(v.weights(), v.tokens() * v.top_k() * 4);
    pad();
  }
  unsigned char h[binary_header_bytes] = {};
  std::memcpy(h, binary_magic.data(), 8);
  put(h + 8, version);
  put(h + 12, static_cast<std::uint32_t>(binary_header_bytes));
  put(h + 16, static_cast<std::uint32_t>(t.experts()));
  put(h + 20, static_cast<std::uint32_t>(t.top_k()));
  put(h + 24, static_cast<std::uint32_t>(t.layers()));
  put(h + 28, static_cast<std::uint32_t>(t.domains().size()));
  put(h + 32, static_cast<std::uint64_t>(t.requests()));
  put(h + 40, static_cast<std::uint64_t>(t.tokens()));
  put(h + 48, written);
  put(h + 56, hash.digest());
  if (version >= 2)
    put(h + 64, static_cast<std::uint64_t>(t.hidden_layers()) | (v3 && layer_table ? binary_has_layer_table : 0) |
                    (v3 && t.has_request_names() ? binary_has_request_names : 0));
  put(h + 72, checksum64::of(h, 72));
  sink.write_header(h, sizeof h);
}

struct vector_sink {
  std::vector<std::byte> bytes = std::vector<std::byte>(binary_header_bytes);
  void write(const void* p, std::size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    bytes.insert(bytes.end(), b, b + n);
  }
  void write_header(const void* p, std::size_t n) { std::memcpy(bytes.data(), p, n); }
};

//! Writes into a locus::atomic_file: the header is filled in last; the caller commits.
class file_sink {
public:
  explicit file_sink(atomic_file& f) : f_(f) {
    static constexpr unsigned char zero[binary_header_bytes] = {};
    f_.write(zero, sizeof zero);
  }
  void write(const void* p, std::size_t n) { f_.write(p, n); }
  void write_header(const void* p, std::size_t n) { f_.write_at(0, p, n); }

private:
  atomic_file& f_;
};

} // namespace detail::trace

//! The binary encoding of `t` in memory.
inline std::vector<std::byte> encode_trace(const trace& t) {
  detail::trace::vector_sink sink;
  detail::trace::write(t, sink);
  return std::move(sink.bytes);
}

//! Writes `t` in the binary format into `f`, which the caller then commits (a command with several
//! outputs commits them together). Into a target written straight through (a pipe, /dev/stdout:
//! atomic_file::direct()), whose header cannot be filled in last, the trace is encoded in memory
//! first. @throws locus::io_error when the file cannot be written
inline void write_trace(const trace& t, atomic_file& f) {
  if (f.direct()) {
    const auto bytes = encode_trace(t);
    f.write(bytes.data(), bytes.size());
    return;
  }
  detail::trace::file_sink sink(f);
  detail::trace::write(t, sink);
}

//! Writes `t` to `path` in the binary format, atomically (a temporary file renamed into place, so
//! a failed write never leaves a partial trace where a good one was).
//! @throws locus::io_error when the file cannot be written (the old file, if any, is kept)
inline void write_trace(const trace& t, const std::string& path) {
  atomic_file f(path);
  write_trace(t, f);
  f.commit();
}

//! Reads a binary trace file.
//! @throws locus::format_error (offset = byte offset of the bad field) on any malformed content;
//!         locus::io_error when the file cannot be read
inline trace read_trace(const std::string& path) {
  detail::trace::file_source src(path);
  return detail::trace::read(src);
}

//! The size of the whole file (header and payload) that `header`, a binary trace's first
//! binary_header_bytes bytes, declares; none where they are no intact header of this format (a
//! wrong magic, a bad checksum). For a reader of a stream (standard input), which has no size to
//! check the header against and must know where the trace ends.
inline std::optional<std::uint64_t> declared_trace_bytes(std::span<const std::byte> header) {
  if (header.size() < binary_header_bytes || std::memcmp(header.data(), binary_magic.data(), 8) != 0)
    return std::nullopt;
  std::uint64_t stored = 0, payload = 0;
  std::memcpy(&payload, header.data() + 48, 8); // little-endian, as the reader requires of the machine
  std::memcpy(&stored, header.data() + 72, 8);
  if (checksum64::of(header.data(), 72) != stored || payload > UINT64_MAX - binary_header_bytes) return std::nullopt;
  return binary_header_bytes + payload;
}

//! Decodes a binary trace held in memory; `name` prefixes error messages.
//! @throws locus::format_error as read_trace
inline trace decode_trace(std::span<const std::byte> bytes, const std::string& name = "<memory>") {
  detail::trace::memory_source src(bytes, name);
  return detail::trace::read(src);
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::trace
