#pragma once
//! @file
//! Groupers chosen by name at run time: `any_grouper` holds one of the library's groupers and is
//! itself a grouper, so the simulator runs it like any other.

#include <locus/grouper/baselines.hpp>
#include <locus/grouper/workload_aware.hpp>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::grouper {

class any_grouper {
public:
  using policy_concept = grouper_tag;

  template <grouper_for G>
  explicit any_grouper(G g) : impl_(std::move(g)) {}

  std::size_t assign(const arrival& a, const cluster_state& c) {
    return std::visit([&](auto& g) -> std::size_t { return g.assign(a, c); }, impl_);
  }

  //! The held grouper when it is a `G`, else null (to read its statistics).
  template <class G>
  const G* get_if() const noexcept {
    return std::get_if<G>(&impl_);
  }

private:
  std::variant<round_robin, least_loaded, workload_aware> impl_;
};

//! Names accepted by grouper_by_name.
inline std::vector<std::string> grouper_names() { return {"round_robin", "least_loaded", "workload_aware"}; }

//! A fresh grouper called `name`; `workload_aware` runs on `model` (from workload_model::fit or
//! placement::plan_activation_aware).
//! @throws locus::config_error for an unknown name, or workload_aware without a model
inline any_grouper grouper_by_name(std::string_view name, std::shared_ptr<const workload_model> model = nullptr) {
  if (name == "round_robin") return any_grouper(round_robin{});
  if (name == "least_loaded") return any_grouper(least_loaded{});
  if (name == "workload_aware") {
    LOCUS_REQUIRE(model != nullptr, config_error,
                  "grouper workload_aware needs a fitted workload_model (fit it on a training trace)");
    return any_grouper(workload_aware(std::move(model)));
  }
  std::string known;
  for (const auto& n : grouper_names())
    known += (known.empty() ? "" : ", ") + n;
  LOCUS_THROW(config_error, "unknown grouper \"", name, "\" (known: ", known, ")");
}

} // namespace locus::inline LOCUS_ABI_NAMESPACE::grouper
