#pragma once
//! @file
//! `locus::moe_layer`: one expert-parallel MoE layer on one rank, composed from policies.
//!
//! `forward` = route → layout → dispatch → expert compute → combine, plus the shared experts:
//! 1. route: logits = x·W_router (fp32), then the router policy picks each token's top-k;
//! 2. layout (transport/layout.hpp): each token's destinations, replicas chosen locality-first,
//!    flat or node-hierarchical as the transport says, computed once for the step;
//! 3. dispatch (transport/dispatch.hpp): rows packed once and exchanged into a handle;
//! 4. expert compute: the policy turns each local expert's row block into outputs, reading the
//!    rows in place in the receive buffers (a compute that fuses combine's weighted sum, as
//!    swiglu_host does, writes per-copy sums instead of output rows);
//! 5. combine: outputs return to their source ranks and are summed with the routing weights (or,
//!    for a router whose weights apply to the expert input, as Llama 4's do, the received rows
//!    are scaled by them before step 4 and the outputs summed as they are: `routing_weight_site`);
//! 6. shared experts (when the shape has them) run on every rank on its own tokens and are added.
//!
//! Policies are given in any order after the shape and the topology, with defaults for those left
//! out (`policy_set`): router `router::softmax_topk<top_k<K>>` with the shape's K (or
//! `layer::given_routing`), transport `transport::local_flat`, backend `backend::host`, expert
//! compute `layer::swiglu_host<float>` on the host backend (`swiglu_cuda<float>` on CUDA). Only
//! what acts in a step is a layer policy: which rank serves a request (grouper) and where experts
//! live (placement) are decided before the layer exists, by the planning functions
//! (`locus/planning.hpp`), and reach it as the expert map.
//!
//! Every step is collective over the transport: a rank whose own input is bad still takes part in
//! the exchanges (with no tokens) and raises afterwards, so its peers never wait for it.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <exception>
#include <functional>
#include <locus/backend/host.hpp>
#include <locus/core/error.hpp>
#include <locus/core/expert_map.hpp>
#include <locus/core/moe_shape.hpp>
#include <locus/core/parallel_for.hpp>
#include <locus/core/policy.hpp>
#include <locus/core/routing.hpp>
#include <locus/core/topology.hpp>
#include <locus/layer/detail/shared_sum_stages.hpp>
#include <locus/layer/expert_compute.hpp>
#include <locus/router/logits.hpp>
#include <locus/router/softmax_topk.hpp>
#include <locus/transport/dispatch.hpp>
#include <locus/transport/local.hpp>
#include <memory>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

namespace locus::inline LOCUS_ABI_NAMESPACE::layer {

//! The router policy of a layer whose caller supplies each step's routing (an engine that routes
//! elsewhere, or a replay of recorded routings): `moe_layer::forward(x, routing, y)` only. `Site`:
//! where the given weights apply (a Llama 4 layer routed elsewhere gives
//! `given_routing_at<weight_site::expert_input>`).
template <weight_site Site>
struct given_routing_at {
  using policy_concept = router_tag;
  static constexpr const char* name = "given_routing";
  static constexpr weight_site routing_weight_site = Site;
};
//! Given routings whose weights multiply the expert outputs (most models).
using given_routing = given_routing_at<weight_site::expert_output>;

//! What the router sees of logits = x·W_router, which the layer computes in fp32: those logits, or
//! the same rounded to bf16, as an engine whose router is a bf16 linear layer has them (Qwen3,
//! Mixtral and Llama 4 in vLLM and Hugging Face; DeepSeek-V3's router is fp32 there too). The
//! rounding keeps the chosen experts but for bf16 ties and moves the weights by about 1%.
enum class router_logits : std::uint8_t { fp32, bf16 };

} // namespace locus::inline LOCUS_ABI_NAMESPACE::layer

namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer {

template <class R>
inline constexpr bool is_given_routing = false;
template <weight_site S>
inline constexpr bool is_given_routing<locus::layer::given_routing_at<S>> = true;

//! Where a router's weights apply: its own `routing_weight_site`, else the expert output.
template <class R>
inline constexpr weight_site routing_weight_site_of = weight_site::expert_output;
template <class R>
requires requires {
  { R::routing_weight_site } -> std::convertible_to<weight_site>;
}
inline constexpr weight_site routing_weight_site_of<R> = R::routing_weight_site;

template <class R, class K>
struct router_top_k {
  using type = K;
};
template <class R, class K>
requires requires { typename R::top_k_type; }
struct router_top_k<R, K> {
  using type = typename R::top_k_type;
};

//! The device-resident step of a moe_layer on a device backend; defined by
//! <locus/layer/moe_layer_cuda.hpp>.
template <class Layer>
struct device_step {
  static_assert(sizeof(Layer) == 0, "locus::moe_layer: the device-resident forward needs "
                                    "#include <locus/layer/moe_layer_cuda.hpp> (and a CUDA compiler)");
};

//! What a router needs of the expert count, at compile time: its own `expert_fit` (sigmoid_grouped)
//! when the router and the shape's experts are static; otherwise set_router checks it at run time
//! (validate_experts).
template <class R, class E>
struct grouped_router_fit {
  static constexpr bool divides = true, two_per_group = true, k_fits = true;
};
template <class R, class E>
requires E::is_static && requires { typename R::template expert_fit<E::static_value>; }
struct grouped_router_fit<R, E> : R::template expert_fit<E::static_value> {};

template <class C>
struct activation_of {
  using type = float;
};
template <class C>
requires requires { typename C::activation_type; }
struct activation_of<C> {
  using type = typename C::activation_type;
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE::detail::layer

namespace locus::inline LOCUS_ABI_NAMESPACE {

//! One MoE layer of an expert-parallel deployment, as seen by one rank.
//! @tparam Shape    `locus::moe_shape<...>` (static or dynamic extents)
//! @tparam Topology `locus::topology<...>`
//! @tparam Policies router, transport, backend and expert-compute policies in any order; each kind
//!                  at most once, defaults for those left out
template <any_moe_shape Shape, any_topology Topology, class... Policies>
class moe_layer {
  using policies = policy_set<Policies...>;
  using router_choice = typename policies::template get<router_tag, router::softmax_topk<typename Shape::top_k_type>>;

public:
  using shape_type = Shape;
  using topology_type = Topology;
  // given_routing routes nothing: it names the layer's mode and is no router to check.
  using router_type =
      typename std::conditional_t<detail::layer::is_given_routing<router_choice>, std::type_identity<router_choice>,
                                  require_router<router_choice>>::type;
  using transport_type =
      typename require_transport<typename policies::template get<transport_tag, transport::local_flat>>::type;
  using backend_type = typename require_backend<typename policies::template get<backend_tag, backend::host>>::type;
  using expert_compute_type =
      typename policies::template get<expert_compute_tag,
                                      typename detail::layer::default_expert_compute<backend_type>::type>;
  //! The transport's host object (one per rank): local_transport, mpi_transport...
  using exchanger_type = typename transport_type::exchanger_type;
  //! Element type of hidden states, inputs and outputs.
  using value_type = typename detail::layer::activation_of<expert_compute_type>::type;
  using top_k_type = typename Shape::top_k_type;
  //! The routing the router writes: in the router's top-k type (the shape's for given_routing).
  using routing_top_k_type = typename detail::layer::router_top_k<router_type, top_k_type>::type;
  using routing_type = routing<routing_top_k_type>;
  //! Where the routing weights apply, as the router policy says: the expert output (y = Σ w·E(x)),
  //! or its input (y = Σ E(w·x): router::sigmoid_top1, Llama 4's gating).
  static constexpr weight_site routing_weight_site = detail::layer::routing_weight_site_of<router_type>;

  static_assert(transport::transport<transport_type>,
                "locus::moe_layer: the transport policy must name its host object (`exchanger_type`) and its "
                "`kind` (locus::transport_kind)");
  static_assert(std::invocable<expert_compute_type&, const layer::expert_blocks<value_type, memory_space::host>&>,
                "locus::moe_layer: the expert compute must accept the host blocks dispatch delivers "
                "(layer::expert_blocks<value_type>)");
  static_assert(!routing_top_k_type::is_static || !top_k_type::is_static ||
                    routing_top_k_type::static_value == top_k_type::static_value,
                "locus::moe_layer: the router's top_k differs from the shape's");
  using router_fit = detail::layer::grouped_router_fit<router_type, typename Shape::experts_type>;
  static_assert(router_fit::divides, "locus::moe_layer: the router's groups do not divide the shape's experts");
  static_assert(router_fit::two_per_group,
                "locus::moe_layer: the router's groups hold fewer than 2 experts each (the group score sums two)");
  static_assert(router_fit::k_fits, "locus::moe_layer: the router's top_k exceeds the experts of its top_groups");

  //! The layer's own checks of topology and map, before the dispatcher (a member built from them)
  //! would raise its own message about them.
  static std::unique_ptr<const expert_map> checked_map(const Shape& shape, const Topology& topo,
                                                       const exchanger_type& ex, expert_map map) {
    LOCUS_REQUIRE(ex.topology().nodes() == topo.nodes() && ex.topology().gpus_per_node() == topo.gpus_per_node(),
                  config_error, "moe_layer: the layer's topology is ", topo.nodes(), " nodes × ", topo.gpus_per_node(),
                  " GPUs but the transport's is ", ex.topology().nodes(), " × ", ex.topology().gpus_per_node());
    LOCUS_REQUIRE(map.experts() == shape.experts(), config_error, "moe_layer: the expert map places ", map.experts(),
                  " experts but the shape has ", shape.experts());
    // Here, not at the first forward's layout, which would refuse it on every step.
    if constexpr (!routing_top_k_type::is_static)
      LOCUS_REQUIRE(shape.top_k() <= transport::max_dynamic_top_k, config_error, "moe_layer: top_k ", shape.top_k(),
                    " exceeds the ", transport::max_dynamic_top_k,
                    " a dynamic top_k takes (give the shape a static top_k<", shape.top_k(), ">)");
    return std::make_unique<const expert_map>(std::move(map));
  }

  //! @param shape   the layer's shape (experts, top-k, hidden, shared experts)
  //! @param topo    the deployment; must equal the exchanger's topology
  //! @param ex      this rank's transport endpoint (outlives the layer)
  //! @param map     where the routed experts live; its ranks are the topology's
  //! @param experts the expert compute of the experts this rank hosts under `map`
  //! @param backend where the step runs: `backend::host{threads}` (worker threads: routing, layout
  //!                and an expert compute left at its default of all hardware threads) or
  //!                `backend::cuda{stream}` (the stream every kernel and copy is issued on)
  //! @throws locus::config_error on any disagreement between shape, topology, map, transport and
  //!         compute (which rank count, which expert, which flag, which hidden size)
  moe_layer(Shape shape, Topology topo, exchanger_type& ex, expert_map map, expert_compute_type experts,
            backend_type backend = {})
      : shape_(shape), topo_(topo), ex_(&ex), map_(checked_map(shape, topo, ex, std::move(map))),
        compute_(std::move(experts)), dispatcher_(*ex_, *map_, shape_.hidden()), backend_(backend),
        routing_(0, routing_k()) {
    LOCUS_REQUIRE(dispatcher_.kind() == transport_type::kind, config_error, "moe_layer: the policy is ",
                  to_string(transport_type::kind), " but the transport endpoint was made ",
                  to_string(dispatcher_.kind()));
    check_compute(compute_, dispatcher_.local_experts(), "routed expert");
    bound_threads(compute_);
    dispatcher_.set_weight_site(routing_weight_site);
    // By default the order it was made in on its endpoint (the library's transports count them):
    // layers stepped in another order than they were made on some rank then raise there too.
    if constexpr (requires { ex.next_layer_ordinal(); }) set_layer_index(ex.next_layer_ordinal());
  }

  //! Which layer of the model this is, given alike on every rank. Ranks that step two layers in
  //! different orders then raise together (the index enters every exchange's agreement): two layers
  //! of one expert map with one index would exchange one layer's tokens into the other's experts
  //! without a word. Default: the order the layer was made in on its endpoint (0, 1, ...; 0 over a
  //! transport of the caller's that does not count them), right when every rank makes its layers in
  //! the same order; an engine that makes them otherwise gives each its model layer index. It also
  //! seeds same_gpu_else_random's static draws, as the traffic model seeds them by layer.
  void set_layer_index(std::uint64_t index) noexcept {
    layer_index_ = index;
    dispatcher_.set_layer_index(index);
  }
  std::uint64_t layer_index() const noexcept { return layer_index_; }

  //! How this layer's tokens pick among an expert's replicas: the engine rule the plan was judged
  //! under (transport/replica_selection.hpp; default locality_first). `hot` (locality_bounded: per
  //! rank, nonzero above the load bound, as the caller's load counters say, smaller for a less
  //! loaded hot rank; what hot_rank_tracker::hot() gives) may be empty. A span, so that a braced
  //! list does not compile: `set_replica_policy(rule, {3})`, the layer index this took before
  //! set_layer_index, would read as one hot-rank flag.
  //! @throws locus::config_error when `hot` is neither empty nor one flag per rank
  void set_replica_policy(placement::replica_rule rule, std::span<const std::uint8_t> hot = {}) {
    LOCUS_REQUIRE(hot.empty() || hot.size() == topo_.ranks(), config_error,
                  "moe_layer::set_replica_policy: ", hot.size(), " hot-rank flags for ", topo_.ranks(), " ranks");
    replica_rule_ = rule;
    hot_ranks_.assign(hot.begin(), hot.end());
  }

  //! Sets the router and its weights (`hidden × experts`, row-major): logits = x·gate in fp32, handed
  //! to the router as they are or rounded to bf16 (`logits`: what the model's engine computes).
  //! @throws locus::config_error when the router's top_k differs from the shape's, the router does
  //!         not suit the shape's expert count (sigmoid_grouped: groups that do not divide it, a
  //!         bias of another size) or the gate has the wrong size
  void set_router(router_type router, std::vector<float> gate,
                  layer::router_logits logits =
                      layer::router_logits::fp32) requires(!detail::layer::is_given_routing<router_type>) {
    LOCUS_REQUIRE(router.top_k() == shape_.top_k(), config_error, "moe_layer::set_router: the router picks ",
                  router.top_k(), " experts per token, the shape ", shape_.top_k());
    // Here rather than at the first forward, which would raise it only after the step's exchanges.
    if constexpr (requires { router.validate_experts(shape_.experts()); }) router.validate_experts(shape_.experts());
    LOCUS_REQUIRE(gate.size() == shape_.hidden() * shape_.experts(), config_error,
                  "moe_layer::set_router: the router weights have ", gate.size(),
                  " values, expected hidden × experts = ", shape_.hidden(), " × ", shape_.experts());
    router_.emplace(std::move(router));
    gate_ = std::move(gate);
    logits_rounding_ = logits;
    ++router_version_; // the device step uploads the router again
  }

  //! Sets the router weights with the router built from the shape's top_k (softmax_topk and the
  //! like).
  void set_router(std::vector<float> gate, layer::router_logits logits = layer::router_logits::fp32) requires(
      !detail::layer::is_given_routing<router_type> && std::constructible_from<router_type, std::size_t>) {
    set_router(router_type(shape_.top_k()), std::move(gate), logits);
  }

  //! Sets the shared experts (every token passes through each), held on every rank; the compute
  //! must hold experts 0 .. shape.shared_experts() - 1. Their outputs are added with weight 1
  //! (DeepSeek-V3, Llama 4), or, given a `gate` of `hidden` values, with weight sigmoid(x·gate) per
  //! token (Qwen2-MoE's and Qwen3-Next's shared_expert_gate: a 1-output linear layer, fp32 here),
  //! the gate scaling the shared experts' sum.
  //! @throws locus::config_error when the shape has no shared experts, the compute lacks one or its
  //!         weights have another hidden size, or a gate has another size or a non-finite value
  void set_shared_experts(expert_compute_type shared, std::vector<float> gate = {}) {
    LOCUS_REQUIRE(shape_.shared_experts() > 0, config_error,
                  "moe_layer::set_shared_experts: the shape has no shared experts");
    LOCUS_REQUIRE(gate.empty() || gate.size() == shape_.hidden(), config_error, "moe_layer::set_shared_experts: the ",
                  "gate has ", gate.size(), " values, expected hidden = ", shape_.hidden());
    for (std::size_t h = 0; h < gate.size(); ++h)
      LOCUS_REQUIRE(std::isfinite(gate[h]), config_error, "moe_layer::set_shared_experts: gate value ", h, " is ",
                    gate[h], ", not finite");
    std::vector<expert_id> ids(shape_.shared_experts());
    for (std::size_t s = 0; s < ids.size(); ++s)
      ids[s] = static_cast<expert_id>(s);
    check_compute(shared, ids, "shared expert");
    bound_threads(shared);
    shared_.emplace(std::move(shared));
    shared_gate_ = std::move(gate);
    ++shared_version_; // the device step uploads the gate again
  }

  //! Collective: y = MoE(x) for this rank's tokens, routed by the router policy.
  //! @param x `tokens × hidden` inputs, token-major
  //! @param y `tokens × hidden` outputs; may be `x` itself (in place)
  //! @throws locus::config_error when no router was set
  //! @throws locus::invalid_input_error on sizes that disagree or a non-finite logit (after the
  //!         collective steps, so peers are not left waiting)
  void forward(std::span<const value_type> x,
               std::span<value_type> y) requires(!detail::layer::is_given_routing<router_type>) {
    require_live();
    std::exception_ptr local_error;
    try {
      LOCUS_REQUIRE(router_.has_value(), config_error, "moe_layer::forward: no router weights were set (set_router)");
      LOCUS_REQUIRE(y.size() == x.size(), invalid_input_error, "moe_layer::forward: ", x.size(), " input values but ",
                    y.size(), " output values");
      route(x);
    } catch (...) {
      local_error = std::current_exception();
      routing_ = routing_type(0, routing_k());
    }
    run(local_error ? std::span<const value_type>{} : x, routing_.view(), y, local_error);
  }

  //! Collective: y = MoE(x) with a routing given by the caller (`tokens × top_k` ids and weights);
  //! `y` may be `x` (in place).
  //! @throws locus::invalid_input_error on sizes that disagree, an expert id out of range, an
  //!         expert chosen twice by one token or a non-finite weight (after the collective steps)
  template <class K, class Id, class Weight>
  void forward(std::span<const value_type> x, const routing_view<K, Id, Weight, memory_space::host>& r,
               std::span<value_type> y) {
    static_assert(!K::is_static || !top_k_type::is_static || K::static_value == top_k_type::static_value,
                  "locus::moe_layer::forward: the routing's top_k differs from the shape's");
    constexpr bool element_types =
        std::is_same_v<std::remove_const_t<Id>, expert_id> && std::is_same_v<std::remove_const_t<Weight>, float>;
    static_assert(element_types,
                  "locus::moe_layer::forward: a given routing holds locus::expert_id (int32) ids and float weights "
                  "(locus::routing<top_k<K>> makes one)");
    if constexpr (element_types) forward_given(x, r, y);
  }

  //! Collective, device-resident (`backend::cuda` and a transport with a device exchange:
  //! device_local_*, nccl_*): y = MoE(x) with every token row in device memory from `x` to `y`
  //! (`tokens × hidden` each, device), routed on the device: logits = x·W_router in fp32 (cuBLAS),
  //! then the router policy's CUDA kernel (router::cuda_router); the routing never leaves the
  //! device. Work is issued on the backend's stream; returns once it is queued. `y` may be `x`
  //! (in place). Needs
  //! <locus/layer/moe_layer_cuda.hpp>.
  //! @throws locus::config_error on shared experts in the shape but not set
  //! @throws locus::invalid_input_error on a non-finite logit (after the collective steps, so
  //!         peers are not left waiting)
  void forward(const value_type* x, std::size_t tokens,
               value_type* y) requires(backend_type::space == memory_space::device &&
                                       !detail::layer::is_given_routing<router_type>) {
    require_live();
    detail::layer::device_step<moe_layer>::route_and_run(*this, device_state_, x, tokens, y);
  }

  //! Collective, device-resident, as above but routed by the caller's device routing.
  //! @throws locus::config_error on shared experts in the shape but not set
  //! @throws locus::invalid_input_error on a bad routing (after the collective steps)
  void forward(const value_type* x, const device_routing_view<top_k_type>& r,
               value_type* y) requires(backend_type::space == memory_space::device) {
    require_live();
    detail::layer::device_step<moe_layer>::run(*this, device_state_, x, r, y);
  }

  //! Device-resident: waits for this rank's last step (through the transport's synchronize(), so
  //! the NCCL transport's timeout and error watch cover it) and raises what the device found wrong
  //! in the entry metadata it received then, which the next forward would otherwise raise after
  //! its exchanges (transport::device_dispatcher::finish). Call it after a run's last step.
  //! @throws locus::transport_error when the received metadata was refused
  void finish() requires(backend_type::space == memory_space::device) {
    detail::layer::device_step<moe_layer>::finish(device_state_);
  }

  //! The routing of the last device-routed `forward(x, tokens, y)`, in device memory (valid until
  //! the next forward); no tokens before the first.
  device_routing_view<top_k_type> last_device_routing() const
      requires(backend_type::space == memory_space::device && !detail::layer::is_given_routing<router_type>) {
    return detail::layer::device_step<moe_layer>::last_routing(*this, device_state_);
  }

  const Shape& shape() const noexcept { return shape_; }
  const Topology& topology() const noexcept { return topo_; }
  const expert_map& map() const noexcept { return *map_; }
  exchanger_type& exchanger() noexcept { return *ex_; }
  //! The backend the layer was built with.
  const backend_type& backend() const noexcept { return backend_; }
  expert_compute_type& experts() noexcept { return compute_; }
  //! The routing of the last `forward(x, y)`.
  const routing_type& last_routing() const noexcept { return routing_; }
  //! Rows this rank's experts computed in the last forward (token copies × local choices).
  std::size_t last_expert_rows() const noexcept { return handle_.expert_rows(); }
  //! The dispatcher (local experts, message sizes).
  const transport::moe_dispatcher<exchanger_type, value_type>& dispatcher() const noexcept { return dispatcher_; }
  //! The layout of the last forward's tokens.
  const transport::layout<>& last_layout() const noexcept { return layout_; }

private:
  // forward with a routing of the layer's element types (the public one has refused others).
  template <class K, class Id, class Weight>
  void forward_given(std::span<const value_type> x, const routing_view<K, Id, Weight, memory_space::host>& r,
                     std::span<value_type> y) {
    require_live();
    std::exception_ptr local_error;
    try {
      LOCUS_REQUIRE(r.top_k() == shape_.top_k(), invalid_input_error, "moe_layer::forward: the routing has top_k ",
                    r.top_k(), ", the layer ", shape_.top_k());
      validate_routing(r, shape_.experts());
      // Sizes are checked here, before any exchange, so that the dispatcher never fails half-way.
      LOCUS_REQUIRE(x.size() == r.tokens() * shape_.hidden() && y.size() == x.size(), invalid_input_error,
                    "moe_layer::forward: ", r.tokens(), " tokens of hidden size ", shape_.hidden(), " need ",
                    r.tokens() * shape_.hidden(), " input and output values, got ", x.size(), " and ", y.size());
      LOCUS_REQUIRE(r.tokens() == 0 || r.has_weights(), invalid_input_error,
                    "moe_layer::forward: the routing carries no weights");
    } catch (...) {
      local_error = std::current_exception();
    }
    if (local_error) {
      routing_ = routing_type(0, routing_k());
      run({}, routing_.view(), y, local_error);
    } else {
      run(x, routing_view<top_k_type>(r.ids(), r.weights(), r.tokens(), top_k_extent()), y, nullptr);
    }
  }

  friend struct detail::layer::device_step<moe_layer>;

  // A layer moved from holds no map, dispatcher or router any more (its members were moved out):
  // a step on it is refused at once rather than read what the move left behind.
  void require_live() const {
    LOCUS_REQUIRE(map_ != nullptr, config_error,
                  "moe_layer::forward: this layer was moved from; step the layer it was moved to");
  }

  top_k_type top_k_extent() const { return top_k_type(shape_.top_k()); }
  routing_top_k_type routing_k() const { return routing_top_k_type(shape_.top_k()); }

  template <class Compute>
  void check_compute(const Compute& c, std::span<const expert_id> ids, const char* what) const {
    std::size_t hidden = 0; // 0: a compute that holds no expert (an empty rank) has no size to compare
    if constexpr (requires { c.weights().contains(expert_id{}); }) {
      for (expert_id e : ids)
        LOCUS_REQUIRE(c.weights().contains(e), config_error, "moe_layer: ", what, " ", e,
                      " is hosted on this rank but the expert compute holds no weights for it");
      if constexpr (requires { c.weights().hidden(); })
        if (c.weights().size() > 0) hidden = c.weights().hidden();
    } else if constexpr (requires { c.experts(); }) {
      for (expert_id e : ids) {
        bool found = false;
        for (expert_id h : c.experts())
          found |= h == e;
        LOCUS_REQUIRE(found, config_error, "moe_layer: ", what, " ", e,
                      " is hosted on this rank but the expert compute holds no weights for it");
      }
      if constexpr (requires { c.hidden(); })
        if (!c.experts().empty()) hidden = c.hidden();
    }
    // Weights of another hidden size would otherwise be refused only by the first forward, after
    // its exchanges.
    LOCUS_REQUIRE(hidden == 0 || hidden == shape_.hidden(), config_error, "moe_layer: the ", what,
                  " weights have hidden size ", hidden, " but the shape has ", shape_.hidden());
  }

  // logits = x·gate in fp32, then the router.
  void route(std::span<const value_type> x) requires(!detail::layer::is_given_routing<router_type>) {
    const std::size_t H = shape_.hidden(), E = shape_.experts();
    LOCUS_REQUIRE(x.size() % H == 0, invalid_input_error, "moe_layer::forward: ", x.size(),
                  " input values are not a whole number of tokens of hidden size ", H);
    const std::size_t T = x.size() / H;
    logits_.assign(T * E, 0.0f);
    parallel_for(T, 4, threads(), [&](std::size_t begin, std::size_t end, unsigned) {
      for (std::size_t t = begin; t < end; ++t) {
        float* l = logits_.data() + t * E;
        for (std::size_t h = 0; h < H; ++h) {
          const float xv = to_float(x[t * H + h]);
          const float* g = gate_.data() + h * E;
          for (std::size_t e = 0; e < E; ++e)
            l[e] += xv * g[e];
        }
      }
    });
    if (logits_rounding_ == layer::router_logits::bf16)
      detail::layer::round_to_bf16(transport::detail::stage::grid_index{}, logits_.data(), logits_.size());
    routing_ = routing_type(T, routing_k());
    using experts_type = typename Shape::experts_type;
    router_->route(router::logits_view<experts_type, const float>(logits_.data(), T, experts_type(E)), routing_.view(),
                   threads());
  }

  // A host compute left at all hardware threads (0) takes the backend's bound: ranks run as threads
  // of one process would each start one worker per core otherwise.
  void bound_threads(expert_compute_type& c) const {
    if constexpr (requires(unsigned n) {
                    backend_type{}.threads;
                    c.set_threads(n);
                    { c.threads() } -> std::convertible_to<unsigned>;
                  })
      if (c.threads() == 0) c.set_threads(backend_.threads);
  }

  unsigned threads() const noexcept {
    if constexpr (requires { backend_type{}.threads; })
      return backend_.threads;
    else
      return 0;
  }

  template <class K, class Id, class Weight>
  void run(std::span<const value_type> x, const routing_view<K, Id, Weight, memory_space::host>& r,
           std::span<value_type> y, std::exception_ptr local_error) {
    try {
      dispatcher_.plan(layout_, r, threads(), placement::replica_policy{replica_rule_, layer_index_, hot_ranks_});
    } catch (...) {
      // The routing was validated already; should the layout still refuse it, this rank sends
      // nothing and raises after the step.
      if (!local_error) local_error = std::current_exception();
      dispatcher_.plan(
          layout_, routing_view<top_k<>, const expert_id, const float>(nullptr, nullptr, 0, top_k<>(shape_.top_k())));
    }
    dispatcher_.dispatch(local_error ? std::span<const value_type>{} : x, layout_, handle_);
    {
      const auto experts = handle_.local_experts();
      const layer::expert_blocks<value_type> blocks{
          experts.data(),  handle_.expert_offsets().data(),   experts.size(), nullptr, handle_.expert_output().data(),
          shape_.hidden(), handle_.expert_input_rows().data()};
      try {
        if constexpr (fuses_weighted_sum) {
          // The compute adds each output row, weighted, to its copy's sum: combine reads no rows.
          // One that writes each copy's first row needs no zeroed sums.
          if constexpr (writes_first_rows) {
            const auto sums = handle_.copy_sums_to_write();
            compute_(blocks,
                     layer::weighted_sum_target{sums.data(), handle_.row_copies().data(), handle_.sum_weights().data(),
                                                handle_.received_copies(), handle_.row_first().data()});
          } else {
            const auto sums = handle_.copy_sums();
            compute_(blocks, layer::weighted_sum_target{sums.data(), handle_.row_copies().data(),
                                                        handle_.sum_weights().data(), handle_.received_copies()});
          }
        } else {
          compute_(blocks);
        }
      } catch (...) {
        // Zeros are still returned so that peers finish combine (output rows are not cleared
        // between steps; copy_sums() zeroes the sums).
        if constexpr (fuses_weighted_sum) {
          static_cast<void>(handle_.copy_sums());
        } else {
          const auto out = handle_.expert_output();
          std::fill(out.begin(), out.end(), value_type{});
        }
        if (!local_error) local_error = std::current_exception();
      }
    }
    if (local_error) {
      std::vector<value_type> sink(handle_.tokens() * shape_.hidden());
      dispatcher_.combine(sink, handle_);
      std::rethrow_exception(local_error);
    }
    // In place (y over x), the shared experts, which run after combine wrote y, read a copy of x.
    std::span<const value_type> shared_x = x;
    if (shape_.shared_experts() > 0 && overlaps(x.data(), y.data(), std::min(x.size(), y.size()))) {
      shared_in_.assign(x.begin(), x.end());
      shared_x = shared_in_;
    }
    dispatcher_.combine(y, handle_);
    if (shape_.shared_experts() > 0) add_shared(shared_x, y);
  }

  // Whether `n` values from `a` and from `b` share memory (the host and the device step's in-place test).
  static bool overlaps(const value_type* a, const value_type* b, std::size_t n) noexcept {
    const std::less<const value_type*> before;
    return n > 0 && before(a, b + n) && before(b, a + n);
  }

  void add_shared(std::span<const value_type> x, std::span<value_type> y) {
    LOCUS_REQUIRE(shared_.has_value(), config_error, "moe_layer::forward: the shape has ", shape_.shared_experts(),
                  " shared experts but none were set (set_shared_experts)");
    const std::size_t H = shape_.hidden(), T = x.size() / H;
    shared_out_.resize(x.size());
    acc_.resize(x.size());
    // The device step's bodies (detail/shared_sum_stages.hpp) as one host thread: routed and shared
    // parts summed in fp32 and rounded once.
    const auto one_thread = transport::detail::stage::grid_index{};
    for (std::size_t s = 0; s < shape_.shared_experts(); ++s) {
      const expert_id id = static_cast<expert_id>(s);
      const std::size_t offsets[2] = {0, T};
      (*shared_)(layer::expert_blocks<value_type>{&id, offsets, 1, x.data(), shared_out_.data(), H});
      detail::layer::accumulate(one_thread, shared_out_.data(), acc_.size(), s == 0, acc_.data());
    }
    const float* score = nullptr;
    if (!shared_gate_.empty()) {
      gate_score_.resize(T);
      gate_partial_.resize(T * detail::layer::gate_lanes);
      detail::layer::gate_partials(one_thread, x.data(), T, H, shared_gate_.data(), gate_partial_.data());
      detail::layer::gate_finish(one_thread, gate_partial_.data(), T, gate_score_.data());
      score = gate_score_.data();
    }
    detail::layer::add_sum(one_thread, acc_.data(), y.size(), y.data(), score, H);
  }

  // A compute with an overload taking a weighted_sum_target forms combine's sums itself.
  static constexpr bool fuses_weighted_sum =
      std::invocable<expert_compute_type&, const layer::expert_blocks<value_type, memory_space::host>&,
                     const layer::weighted_sum_target&>;
  // ... and, declaring writes_first_rows, writes each copy's first row instead of adding it.
  static constexpr bool writes_first_rows = layer::first_row_writer<expert_compute_type>;

  Shape shape_;
  Topology topo_;
  exchanger_type* ex_;
  // On the heap: the dispatcher keeps a pointer to it, which must survive the layer's moves (a
  // std::vector of layers, one per model layer, moves them as it grows). Unique: a layer is one
  // rank's endpoint of collective steps, with buffers of its own, and is not copied.
  std::unique_ptr<const expert_map> map_;
  expert_compute_type compute_;
  transport::moe_dispatcher<exchanger_type, value_type> dispatcher_;
  placement::replica_rule replica_rule_ = placement::replica_rule::locality_first;
  std::uint64_t layer_index_ = 0;
  std::vector<std::uint8_t> hot_ranks_;
  transport::layout<> layout_;
  transport::dispatch_handle<value_type> handle_;
  [[no_unique_address]] backend_type backend_;
  std::optional<router_type> router_;
  std::optional<expert_compute_type> shared_;
  std::vector<float> gate_, logits_, acc_;
  // The shared experts' gate (empty: weight 1), its lane sums and its scores.
  std::vector<float> shared_gate_, gate_partial_, gate_score_;
  std::uint64_t shared_version_ = 0;
  std::vector<value_type> shared_out_, shared_in_;
  routing_type routing_;
  std::uint64_t router_version_ = 0;
  layer::router_logits logits_rounding_ = layer::router_logits::fp32;
  std::shared_ptr<void> device_state_; // the device step's buffers (moe_layer_cuda.hpp), made on first use
};

} // namespace locus::inline LOCUS_ABI_NAMESPACE
