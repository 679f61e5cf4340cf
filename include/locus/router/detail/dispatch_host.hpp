#pragma once
//! @file
//! Host dispatch of the routers: input validation shared by all of them and the multithreaded
//! loop over tokens (contiguous chunks per worker, scratch allocated once per chunk).

#include <cstddef>
#include <locus/core/error.hpp>
#include <locus/core/parallel_for.hpp>
#include <locus/core/routing.hpp>
#include <locus/router/detail/math.hpp>
#include <locus/router/logits.hpp>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router {

//! Tokens below which a chunk is not worth a thread (a token costs 0.1-1 µs).
inline constexpr std::size_t host_grain = 512;

//! Checks the shapes and pointers every router needs. @throws locus::config_error or
//! locus::invalid_input_error saying which of them is wrong.
template <class Experts, class T, memory_space InSpace, class TopK, class Id, class W, memory_space OutSpace>
void validate_route_arguments(const char* router, const locus::router::logits_view<Experts, T, InSpace>& logits,
                              const routing_view<TopK, Id, W, OutSpace>& out, std::size_t k) {
  static_assert(!(Experts::is_static && TopK::is_static) || TopK::static_value <= Experts::static_value,
                "locus::router: the routing's static top_k exceeds the logits' static expert count");
  LOCUS_REQUIRE(k <= logits.experts(), config_error, "router::", router, ": top_k ", k, " exceeds the ",
                logits.experts(), " experts of the logits");
  LOCUS_REQUIRE(out.top_k() == k, invalid_input_error, "router::", router, ": the output routing has top_k ",
                out.top_k(), " but the router chooses ", k);
  LOCUS_REQUIRE(out.tokens() == logits.tokens(), invalid_input_error, "router::", router, ": ", logits.tokens(),
                " tokens of logits but the output routing has ", out.tokens(), " tokens");
  LOCUS_REQUIRE(logits.tokens() == 0 || logits.data() != nullptr, invalid_input_error, "router::", router,
                ": the logits pointer is null");
  LOCUS_REQUIRE(logits.tokens() == 0 || (out.ids() != nullptr && out.weights() != nullptr), invalid_input_error,
                "router::", router, ": the output routing needs both ids and weights");
}

//! Runs `token(t, ids, weights, fscratch, iscratch)` for every token on up to `threads` workers.
//! `token` returns -1 or the first expert with a non-finite logit, which is raised here as
//! locus::invalid_input_error naming the router, token, expert and value (the lowest such token
//! when several are bad, whatever the thread count).
template <class Experts, class T, class TopK, class Token>
void route_host(const char* router, const locus::router::logits_view<Experts, T, memory_space::host>& logits,
                const routing_view<TopK, expert_id, float, memory_space::host>& out, unsigned threads,
                std::size_t scratch_floats, std::size_t scratch_ints, Token&& token) {
  const std::size_t k = out.top_k();
  parallel_for(logits.tokens(), host_grain, threads, [&](std::size_t begin, std::size_t end, unsigned) {
    std::vector<float> fscratch(scratch_floats);
    std::vector<int> iscratch(scratch_ints);
    for (std::size_t t = begin; t < end; ++t) {
      const int bad = token(logits.row(t), out.ids() + t * k, out.weights() + t * k, fscratch.data(), iscratch.data());
      if (LOCUS_UNLIKELY(bad >= 0))
        LOCUS_THROW(invalid_input_error, "router::", router, ": token ", t, ", expert ", bad, ": logit ",
                    load_logit(logits.row(t) + bad), " is not finite");
    }
  });
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::router
