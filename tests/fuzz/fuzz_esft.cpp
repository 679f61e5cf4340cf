// libFuzzer target: the ESFT TSV importer (in-memory entry). Input layout: byte 0 picks top_k
// (1..4) and byte 1 the expert count (top_k..top_k+15); the rest is split at form feeds ('\f')
// into the layer files of one domain (at most 4), and at a second '\v' into a second domain.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <locus/trace/esft.hpp>
#include <string_view>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  const std::size_t k = 1 + data[0] % 4;
  const std::size_t experts = k + data[1] % 16;
  std::string_view rest(reinterpret_cast<const char*>(data + 2), size - 2);
  std::vector<locus::trace::esft_domain_text> domains;
  for (std::string_view dom_text :
       {rest.substr(0, rest.find('\v')),
        rest.find('\v') == std::string_view::npos ? std::string_view{} : rest.substr(rest.find('\v') + 1)}) {
    if (!domains.empty() && dom_text.empty()) break;
    locus::trace::esft_domain_text d;
    d.name = domains.empty() ? "a" : "b";
    for (int l = 0; l < 4; ++l) {
      const auto cut = dom_text.find('\f');
      d.layers.push_back({"L" + std::to_string(l + 1), dom_text.substr(0, cut)});
      if (cut == std::string_view::npos) break;
      dom_text.remove_prefix(cut + 1);
    }
    domains.push_back(std::move(d));
  }
  try {
    const auto t = locus::trace::import_esft(domains, experts, k);
    // Invariants a successful import must hold.
    std::size_t tokens = 0;
    for (const auto& q : t.request_table())
      tokens += q.length;
    if (tokens != t.tokens() || t.layers() != domains.front().layers.size()) std::abort();
    for (std::size_t l = 0; l < t.layers(); ++l)
      for (std::size_t i = 0; i < t.tokens() * k; ++i)
        if (t.layer(l).ids()[i] >= experts) std::abort();
  } catch (const locus::error&) {
  }
  return 0;
}
