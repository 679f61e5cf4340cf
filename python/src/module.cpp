// locus._core: the C++ core for Python. Thin: array shapes and dtypes are normalised by the
// Python layer (python/locus/__init__.py); everything here checks sizes again, because a wrong
// size must raise, never read out of bounds.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <locus/core/atomic_file.hpp>
#include <locus/core/cancel.hpp>
#include <locus/core/expert_map_json.hpp>
#include <locus/core/version.hpp>
#include <locus/cost/decode_simulator.hpp>
#include <locus/cost/simulation_json.hpp>
#include <locus/grouper/by_name.hpp>
#include <locus/grouper/workload_model_json.hpp>
#include <locus/placement/activation_plan.hpp>
#include <locus/placement/by_name.hpp>
#include <locus/placement/engine_export.hpp>
#include <locus/placement/eplb.hpp>
#include <locus/placement/live_replan_json.hpp>
#include <locus/placement/load_import.hpp>
#include <locus/placement/migration.hpp>
#include <locus/placement/trace_load.hpp>
#include <locus/trace/binary.hpp>
#include <locus/trace/esft.hpp>
#include <locus/trace/statistics.hpp>
#include <locus/transport/replica_selection.hpp>
#include <mutex>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using maps_in = nb::ndarray<const std::int32_t, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using load_in = nb::ndarray<const double, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// Python exception types, created at import (see NB_MODULE).
PyObject* error_type = nullptr;
PyObject* config_type = nullptr;
PyObject* input_type = nullptr;
PyObject* format_type = nullptr;
PyObject* io_type = nullptr;

// repr(v) cut to 80 characters, for messages (a plan's repr runs to pages).
std::string short_repr(nb::handle v) {
  std::string r = nb::repr(v).c_str();
  return r.size() <= 80 ? r : r.substr(0, 77) + "...";
}

// A count or index argument (anything with __index__): a value outside [min, max] (a negative one
// included) is a ConfigError naming the argument and its range, not the TypeError nanobind gives
// when an unsigned cast fails.
std::uint64_t count_arg(nb::handle v, const char* name, std::uint64_t max = UINT64_MAX, std::uint64_t min = 0) {
  nb::object i = nb::steal(PyNumber_Index(v.ptr()));
  if (!i.is_valid()) {
    // A float or a string: Python's TypeError, naming the argument (Python's alone does not).
    PyErr_Clear();
    throw nb::type_error(locus::detail::concat(name, " is ", short_repr(v), " (", Py_TYPE(v.ptr())->tp_name,
                                               "), expected a whole number")
                             .c_str());
  }
  const unsigned long long n = PyLong_AsUnsignedLongLong(i.ptr());
  const bool bad = n == static_cast<unsigned long long>(-1) && PyErr_Occurred();
  if (bad) PyErr_Clear();
  if (bad || n > max || n < min) {
    // Without a bound of its own, the range is 64 bits: a negative count is named as below the
    // least, not as outside 0 to 18446744073709551615.
    const bool too_big = bad && PyObject_RichCompareBool(i.ptr(), nb::int_(0).ptr(), Py_GT) == 1;
    const std::string range = max != UINT64_MAX ? locus::detail::concat("from ", min, " to ", max)
                              : too_big         ? std::string("below 2^64")
                                                : locus::detail::concat(">= ", min);
    throw locus::config_error(
        locus::detail::concat(name, " is ", nb::str(i).c_str(), ", expected a whole number ", range), nullptr, 0);
  }
  return n;
}
std::size_t size_arg(nb::handle v, const char* name) { return static_cast<std::size_t>(count_arg(v, name)); }

// A list of counts (layer ids), each checked as by count_arg.
template <class T = std::size_t>
std::vector<T> counts_arg(nb::handle seq, const char* name) {
  std::vector<T> out;
  std::size_t i = 0;
  for (nb::handle v : seq) {
    const std::string what = locus::detail::concat(name, "[", i++, "]");
    out.push_back(static_cast<T>(count_arg(v, what.c_str(), std::numeric_limits<T>::max())));
  }
  return out;
}

// A file path (str, bytes or os.PathLike). An embedded NUL would cut the name short at the C
// library and open another file; it is refused.
std::string path_arg(nb::handle p) {
  nb::object fs = nb::steal(PyOS_FSPath(p.ptr()));
  if (!fs.is_valid()) throw nb::python_error();
  nb::object bytes = PyBytes_Check(fs.ptr()) ? fs : nb::steal(PyUnicode_EncodeFSDefault(fs.ptr()));
  if (!bytes.is_valid()) throw nb::python_error();
  std::string out(PyBytes_AS_STRING(bytes.ptr()), static_cast<std::size_t>(PyBytes_GET_SIZE(bytes.ptr())));
  if (out.find('\0') != std::string::npos)
    throw locus::invalid_input_error(
        locus::detail::concat("the path \"", out.substr(0, out.find('\0')), "\\0...\" contains a NUL character"),
        nullptr, 0);
  return out;
}

// Whether the interpreter has begun to shut down (readable without the GIL).
bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Whether the calling thread (holding the GIL) is the interpreter's main thread, the one that runs
// signal handlers and shuts the interpreter down.
bool on_main_thread() {
  try {
    const nb::module_ threading = nb::module_::import_("threading");
    return threading.attr("current_thread")().is(threading.attr("main_thread")());
  } catch (const nb::python_error&) { // no threading module left (late in a shutdown): as the main thread
    return true;
  }
}

// Runs `work` (which must touch no Python object) without the GIL and takes the GIL back after it,
// unless, on a thread other than the main one, the interpreter began to shut down meanwhile:
// CPython ends such a thread when it takes the GIL (pthread_exit, whose unwinding through a
// destructor would end the whole process with std::terminate), so it (a daemon thread whose call
// outlived the program) waits for the process to end instead. The main thread, which runs the
// shutdown, takes the GIL back as always.
template <class F>
auto without_gil(F&& work) {
  using result_t = std::invoke_result_t<F&>;
  const bool main_thread = on_main_thread();
  PyThreadState* const state = PyEval_SaveThread();
  std::exception_ptr failure;
  std::conditional_t<std::is_void_v<result_t>, bool, std::optional<result_t>> result{};
  try {
    if constexpr (std::is_void_v<result_t>)
      work();
    else
      result.emplace(work());
  } catch (...) {
    failure = std::current_exception();
  }
  while (!main_thread && interpreter_finalizing())
    std::this_thread::sleep_for(std::chrono::seconds(1));
  PyEval_RestoreThread(state);
  if (failure) std::rethrow_exception(failure);
  if constexpr (!std::is_void_v<result_t>) return std::move(*result);
}

// File I/O on the file `path` names (str, bytes or os.PathLike: path_arg), run without the GIL so
// that a slow disk or a FIFO that waits for its reader does not stop the interpreter's other
// threads. A signal that interrupts it (Ctrl-C: the system call fails with EINTR) is raised as
// Python's own exception (KeyboardInterrupt) where its handler raises one; nothing is retried (a
// read cut short cannot be resumed by calling again). `io(path)` must touch no Python object.
template <class F>
auto file_io(nb::handle path, F&& io) {
  const std::string p = path_arg(path);
  // A path that names one of the process's descriptors (/dev/stdout) is written through it: what
  // the program printed before, still in Python's buffers, goes first.
  if (locus::open_stream_fd(p) >= 0) {
    const nb::module_ sys = nb::module_::import_("sys");
    for (const char* name : {"stdout", "stderr"})
      if (const nb::object stream = sys.attr(name); !stream.is_none() && nb::hasattr(stream, "flush"))
        stream.attr("flush")();
  }
  try {
    return without_gil([&] { return io(p); });
  } catch (const locus::io_error& e) {
    if (e.code() == EINTR && PyErr_CheckSignals() != 0) throw nb::python_error();
    throw;
  }
}

// Runs `work` (which must touch no Python object) without the GIL, so that the interpreter's other
// threads run meanwhile, and, on the main thread, so that Ctrl-C stops it: `work` runs on a thread
// of its own under a locus::cancel_scope while the main thread asks Python for pending signals every
// 50 ms. When a handler raises (KeyboardInterrupt), the work is told to stop, which the library's
// long loops see within a layer, a step or a few thousand proposals; its result is dropped and the
// handler's exception raised. Other threads run `work` themselves (without_gil): only the main
// thread runs signal handlers, and a thread that took the GIL back every 50 ms while the
// interpreter shut down would be ended on the spot.
template <class F>
auto interruptible(F&& work) {
  using result_t = std::invoke_result_t<F&>;
  static_assert(!std::is_void_v<result_t>, "interruptible: the work returns its result");
  if (!on_main_thread()) return without_gil(work);
  std::atomic<bool> stop{false};
  std::optional<result_t> result;
  std::exception_ptr failure;
  std::mutex m;
  std::condition_variable cv;
  bool done = false, interrupted = false;
  {
    nb::gil_scoped_release released;
    std::thread worker([&] {
      {
        const locus::cancel_scope scope(stop);
        try {
          result.emplace(work());
        } catch (...) {
          failure = std::current_exception();
        }
      }
      const std::lock_guard lock(m);
      done = true;
      cv.notify_one();
    });
    // However this scope is left (an exception taking the GIL back included), the work is told to
    // stop and joined: a joinable std::thread destroyed would end the process.
    struct joiner {
      std::thread& t;
      std::atomic<bool>& stop;
      ~joiner() {
        stop.store(true, std::memory_order_relaxed);
        if (t.joinable()) t.join();
      }
    } const join_on_exit{worker, stop};
    std::unique_lock lock(m);
    while (!cv.wait_for(lock, std::chrono::milliseconds(50), [&] { return done; }))
      if (!interrupted) {
        lock.unlock();
        {
          nb::gil_scoped_acquire held;
          interrupted = PyErr_CheckSignals() != 0; // the handler's exception stays set for below
        }
        if (interrupted) stop.store(true, std::memory_order_relaxed);
        lock.lock();
      }
  }
  if (interrupted) throw nb::python_error();
  if (failure) std::rethrow_exception(failure);
  return std::move(*result);
}

// Pickling: a Trace travels as its binary encoding (docs/trace-format.md) and a WorkloadModel as
// its grouping JSON, the formats the library writes and reads already (a round trip is exact; the
// model's JSON, like save_grouping's file, leaves out which training request fell in which cluster),
// and an unpickled state is checked as a file is: a damaged one raises FormatError, a state of
// another type TypeError. The object is built only from a state that decoded whole.

// The bytes of a pickled state (`type`: the class, for the message).
std::span<const std::byte> state_bytes(nb::handle state, const char* type) {
  if (!PyBytes_Check(state.ptr()))
    throw nb::type_error(locus::detail::concat(type, ".__setstate__ takes the bytes ", type,
                                               ".__getstate__ gives, not ", Py_TYPE(state.ptr())->tp_name)
                             .c_str());
  return {reinterpret_cast<const std::byte*>(PyBytes_AS_STRING(state.ptr())),
          static_cast<std::size_t>(PyBytes_GET_SIZE(state.ptr()))};
}

nb::bytes trace_state(const locus::trace::trace& t) {
  const auto bytes = interruptible([&] { return locus::trace::encode_trace(t); });
  return nb::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

void set_trace_state(locus::trace::trace& self, nb::handle state) {
  const auto bytes = state_bytes(state, "Trace"); // immutable, held by the caller
  auto t = interruptible([&] { return locus::trace::decode_trace(bytes, "pickled Trace"); });
  new (&self) locus::trace::trace(std::move(t));
}

nb::bytes model_state(const locus::grouper::workload_model& m) {
  const std::string text = locus::grouper::grouping_to_json(m).dump();
  return nb::bytes(text.data(), text.size());
}

void set_model_state(locus::grouper::workload_model& self, nb::handle state) {
  const auto bytes = state_bytes(state, "WorkloadModel");
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(reinterpret_cast<const char*>(bytes.data()),
                                reinterpret_cast<const char*>(bytes.data() + bytes.size()));
  } catch (const nlohmann::json::parse_error& e) {
    throw locus::format_error(
        locus::detail::concat("pickled WorkloadModel: not valid JSON: ", locus::detail::json_error_text(e)), e.byte);
  } catch (const nlohmann::json::exception& e) { // a number past a double's range
    throw locus::format_error(
        locus::detail::concat("pickled WorkloadModel: not valid JSON: ", locus::detail::json_error_text(e)), 0);
  }
  std::optional<locus::grouper::workload_model> m;
  try {
    m.emplace(locus::grouper::grouping_from_json(doc));
  } catch (const locus::format_error& e) {
    throw locus::format_error(locus::detail::concat("pickled WorkloadModel: ", e.message()), e.offset());
  }
  new (&self) locus::grouper::workload_model(std::move(*m));
}

// A NumPy array owning `v` (moved), shape `shape`.
template <class T>
nb::ndarray<nb::numpy, T> owned(std::vector<T>&& v, std::initializer_list<std::size_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(heap->data(), shape, owner);
}

std::vector<locus::expert_map> maps_from(const maps_in& a, std::size_t experts) {
  const std::size_t layers = a.shape(0), ranks = a.shape(1), slots = a.shape(2);
  LOCUS_REQUIRE(layers > 0, locus::config_error, "expert maps: the array has no layers");
  std::vector<locus::expert_map> out;
  out.reserve(layers);
  for (std::size_t l = 0; l < layers; ++l) {
    const std::int32_t* row = a.data() + l * ranks * slots;
    try {
      out.emplace_back(experts, ranks, slots, std::vector<locus::expert_id>(row, row + ranks * slots));
    } catch (const locus::invalid_input_error& e) {
      throw locus::invalid_input_error(locus::detail::concat("layer ", l, ": ", e.message()), nullptr, 0);
    }
  }
  return out;
}

nb::ndarray<nb::numpy, std::int32_t> maps_to(const std::vector<locus::expert_map>& maps) {
  LOCUS_REQUIRE(!maps.empty(), locus::config_error, "expert maps: no layers");
  const std::size_t ranks = maps[0].ranks(), slots = maps[0].slots_per_rank();
  std::vector<std::int32_t> flat;
  flat.reserve(maps.size() * ranks * slots);
  for (const auto& m : maps)
    flat.insert(flat.end(), m.slot_table().begin(), m.slot_table().end());
  return owned(std::move(flat), {maps.size(), ranks, slots});
}

std::vector<std::vector<double>> load_from(const load_in& a) {
  std::vector<std::vector<double>> out(a.shape(0));
  for (std::size_t l = 0; l < a.shape(0); ++l)
    out[l].assign(a.data() + l * a.shape(1), a.data() + (l + 1) * a.shape(1));
  return out;
}

// Strings from Python as the trace keeps them: UTF-8 bytes (surrogate escapes, as Trace.domains
// and Trace.request_names give bytes that are not UTF-8, go back to those bytes). `what` names
// the sequence in messages.
std::vector<std::string> utf8_strings(nb::handle seq, const char* what_seq) {
  std::vector<std::string> out;
  std::size_t n = 0;
  for (nb::handle d : seq) {
    const std::string what = locus::detail::concat(what_seq, "[", n++, "]");
    if (!PyUnicode_Check(d.ptr()))
      throw nb::type_error(
          locus::detail::concat(what, " is ", short_repr(d), " (", Py_TYPE(d.ptr())->tp_name, "), expected a str")
              .c_str());
    nb::object bytes = nb::steal(PyUnicode_AsEncodedString(d.ptr(), "utf-8", "surrogateescape"));
    if (!bytes.is_valid()) {
      PyErr_Clear();
      throw locus::invalid_input_error(locus::detail::concat(what, " is ", short_repr(d), ", which has no UTF-8 bytes"),
                                       nullptr, 0);
    }
    out.emplace_back(PyBytes_AS_STRING(bytes.ptr()), static_cast<std::size_t>(PyBytes_GET_SIZE(bytes.ptr())));
  }
  return out;
}

// Strings the trace holds, for Python: not UTF-8 bytes as surrogate escapes (os.fsdecode's way).
nb::list python_strings(const std::vector<std::string>& v) {
  nb::list out;
  for (const auto& s : v)
    out.append(nb::steal(PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogateescape")));
  return out;
}

template <class T, std::size_t N>
using array_in = nb::ndarray<const T, nb::ndim<N>, nb::c_contig, nb::device::cpu>;

// trace_from_arrays' trace from its checked arguments (touches no Python object).
locus::trace::trace build_trace(const array_in<std::int32_t, 3>& ids, std::size_t experts,
                                const array_in<float, 3>& weights, const array_in<std::uint64_t, 1>& requests,
                                const array_in<std::uint8_t, 1>& phases, const array_in<std::uint32_t, 1>& domains,
                                std::vector<std::string> domain_names, const std::vector<std::string>& request_names,
                                std::vector<std::uint32_t> layer_ids, std::uint32_t hidden_layers) {
  const std::size_t tokens = ids.shape(0), layers = ids.shape(1), k = ids.shape(2);
  LOCUS_REQUIRE(tokens > 0, locus::invalid_input_error, "trace_from_arrays: topk_ids has no tokens");
  const bool has_weights = weights.size() > 0;
  LOCUS_REQUIRE(!has_weights || (weights.shape(0) == tokens && weights.shape(1) == layers && weights.shape(2) == k),
                locus::invalid_input_error, "trace_from_arrays: topk_weights has shape [", weights.shape(0), ", ",
                weights.shape(1), ", ", weights.shape(2), "], topk_ids [", tokens, ", ", layers, ", ", k, "]");
  LOCUS_REQUIRE(requests.shape(0) == tokens && phases.shape(0) == tokens && domains.shape(0) == tokens,
                locus::invalid_input_error, "trace_from_arrays: request_ids, phases and domains need ", tokens,
                " entries (one per token); got ", requests.shape(0), ", ", phases.shape(0), ", ", domains.shape(0));
  if (domain_names.empty()) domain_names.push_back("default");
  std::vector<std::vector<std::size_t>> members;
  std::vector<std::uint64_t> request_id;
  std::unordered_map<std::uint64_t, std::size_t> index;
  for (std::size_t t = 0; t < tokens; ++t) {
    const auto [it, fresh] = index.try_emplace(requests.data()[t], members.size());
    if (fresh) {
      members.emplace_back();
      request_id.push_back(requests.data()[t]);
    }
    members[it->second].push_back(t);
    LOCUS_REQUIRE(phases.data()[t] <= 2, locus::invalid_input_error, "trace_from_arrays: token ", t, " has phase ",
                  int(phases.data()[t]), " (0 prefill, 1 decode, 2 unknown)");
    LOCUS_REQUIRE(domains.data()[t] < domain_names.size(), locus::invalid_input_error, "trace_from_arrays: token ", t,
                  " has domain ", domains.data()[t], ", but there are ", domain_names.size(), " domain names");
  }
  // A request as the caller named it: its string where ids were given as strings.
  const auto who = [&](std::size_t r) {
    return request_names.empty() || request_id[r] >= request_names.size()
               ? std::to_string(request_id[r])
               : "\"" + request_names[static_cast<std::size_t>(request_id[r])] + "\"";
  };
  locus::trace::trace_builder b(experts, k, layers);
  b.set_domains(domain_names);
  b.set_model_layers(std::move(layer_ids), hidden_layers);
  b.reserve_tokens(tokens);
  std::size_t next = 0;
  for (std::size_t r = 0; r < members.size(); ++r) {
    const auto& m = members[r];
    // What the readers refuse too (route JSONL: records of one request that disagree on its domain):
    // a request of two domains, or one that decodes before its prefill, would be read as something else.
    bool decoded = false;
    for (const std::size_t t : m) {
      LOCUS_REQUIRE(domains.data()[t] == domains.data()[m.front()], locus::invalid_input_error,
                    "trace_from_arrays: token ", t, " of request ", who(r), " has domain \"",
                    domain_names[domains.data()[t]], "\", its token ", m.front(), " \"",
                    domain_names[domains.data()[m.front()]], "\" (a request has one domain)");
      const auto p = static_cast<locus::trace::phase>(phases.data()[t]);
      LOCUS_REQUIRE(!(decoded && p == locus::trace::phase::prefill), locus::invalid_input_error,
                    "trace_from_arrays: token ", t, " of request ", who(r),
                    " is prefill after a decode token of the request (prefill comes first)");
      decoded = decoded || p == locus::trace::phase::decode;
    }
    const std::uint64_t id = request_id[r];
    LOCUS_REQUIRE(request_names.empty() || id < request_names.size(), locus::invalid_input_error,
                  "trace_from_arrays: request ", id, " has no name (", request_names.size(), " names)");
    b.add_request(id, domains.data()[m.front()], m.size(),
                  request_names.empty() ? std::string_view() : std::string_view(request_names[id]));
    std::int32_t step = 0;
    for (const std::size_t t : m) {
      for (std::size_t l = 0; l < layers; ++l) {
        const std::int32_t* src = ids.data() + (t * layers + l) * k;
        auto dst = b.ids(l, next);
        for (std::size_t j = 0; j < k; ++j) {
          LOCUS_REQUIRE(src[j] >= 0 && static_cast<std::size_t>(src[j]) < experts, locus::invalid_input_error,
                        "trace_from_arrays: topk_ids[", t, ", ", l, ", ", j, "] = ", src[j], " is out of range [0, ",
                        experts, ")");
          dst[j] = static_cast<locus::trace::trace_expert_id>(src[j]);
        }
        if (has_weights) {
          const float* w = weights.data() + (t * layers + l) * k;
          std::copy(w, w + k, b.weights(l, next).begin());
        }
      }
      const auto p = static_cast<locus::trace::phase>(phases.data()[t]);
      b.set_token(next, p, p == locus::trace::phase::decode ? step++ : -1);
      ++next;
    }
  }
  return b.build();
}

// A trace from token-major arrays: ids [T, L, k]; weights [T, L, k] or empty; request ids [T]
// (a request's tokens in order of appearance; requests in order of first appearance); phases [T]
// (0 prefill, 1 decode, 2 unknown; a request's prefill tokens come before its decode tokens);
// domains [T] indexing `domain_names` (every token of a request names the same one);
// `request_names`: empty, or the name of each request id 0, 1, ... (ids given as strings).
// Request ids are any 64-bit unsigned numbers, as traces keep them.
locus::trace::trace trace_from_arrays(array_in<std::int32_t, 3> ids, nb::handle experts_arg, array_in<float, 3> weights,
                                      array_in<std::uint64_t, 1> requests, array_in<std::uint8_t, 1> phases,
                                      array_in<std::uint32_t, 1> domains, nb::handle domain_names_arg,
                                      nb::handle layer_ids_arg, nb::handle hidden_arg, nb::handle request_names_arg) {
  const std::size_t experts = size_arg(experts_arg, "experts");
  auto domain_names = utf8_strings(domain_names_arg, "domain_names");
  const auto request_names = utf8_strings(request_names_arg, "request_ids");
  auto layer_ids = counts_arg<std::uint32_t>(layer_ids_arg, "layer_ids");
  const auto hidden_layers = static_cast<std::uint32_t>(count_arg(hidden_arg, "hidden_layers", UINT32_MAX));
  // The rest reads the arrays' memory only (the caller holds them): without the GIL, so that a
  // trace of millions of tokens leaves the interpreter's other threads running.
  return interruptible([&] {
    return build_trace(ids, experts, weights, requests, phases, domains, std::move(domain_names), request_names,
                       std::move(layer_ids), hidden_layers);
  });
}

} // namespace

NB_MODULE(_core, m) {
  m.doc() = "locus C++ core (see the locus package for the documented API)";
  // A daemon thread still holding a Trace at exit is no leak of the bindings; nanobind's warning
  // said it was ("likely caused by a reference counting issue").
  nb::set_leak_warnings(false);
  // The C++ library's version (core/version.hpp), which the package reports as its own.
  m.attr("__version__") =
      locus::detail::concat(LOCUS_VERSION_MAJOR, ".", LOCUS_VERSION_MINOR, ".", LOCUS_VERSION_PATCH);
  // The library's limits, which the package checks arguments against before a call (naming the
  // argument where the library's own message names its function).
  nb::dict limits;
  limits["experts"] = locus::trace::max_trace_experts;
  limits["top_k"] = locus::trace::max_trace_top_k;
  limits["trace_layers"] = locus::trace::max_trace_layers;
  limits["hidden_layers"] = locus::max_hidden_layers;
  limits["ranks"] = locus::max_topology_ranks;
  limits["expert_read_us"] = locus::cost::max_expert_read_us;
  limits["anneal"] = locus::placement::token_refine_options::max_anneal_per_expert;
  limits["expert_bytes"] = locus::placement::max_expert_bytes;
  limits["esft_top_k"] = locus::trace::esft_options{}.top_k;
  limits["eplb_slots"] = locus::placement::max_eplb_slots;
  limits["mtp_layers"] = locus::placement::model_layers::max_mtp_layers;
  limits["dense_top1_tokens"] = locus::placement::dense_top1_tokens;
  m.attr("_limits") = limits;
  nb::list planners; // checked by name before a trace's phases, so that a typo is named as one
  for (const auto& n : locus::placement::planner_names())
    planners.append(n);
  m.attr("_planners") = planners;

  error_type = PyErr_NewException("locus.LocusError", PyExc_Exception, nullptr);
  auto derived = [&](const char* name, PyObject* builtin) {
    PyObject* bases = PyTuple_Pack(2, error_type, builtin);
    PyObject* t = PyErr_NewException(name, bases, nullptr);
    Py_DECREF(bases);
    return t;
  };
  config_type = derived("locus.ConfigError", PyExc_ValueError);
  input_type = derived("locus.InvalidInputError", PyExc_ValueError);
  format_type = derived("locus.FormatError", PyExc_ValueError);
  io_type = derived("locus.LocusIOError", PyExc_OSError);
  m.attr("LocusError") = nb::handle(error_type);
  m.attr("ConfigError") = nb::handle(config_type);
  m.attr("InvalidInputError") = nb::handle(input_type);
  m.attr("FormatError") = nb::handle(format_type);
  m.attr("LocusIOError") = nb::handle(io_type);
  // The message a C++ caller reads in what(), without the source location.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const locus::error& e) {
      PyObject* type = error_type;
      switch (e.kind()) {
      case locus::error_kind::config: type = config_type; break;
      case locus::error_kind::invalid_input: type = input_type; break;
      case locus::error_kind::format: type = format_type; break;
      case locus::error_kind::io: type = io_type; break;
      default: break;
      }
      const std::string msg = std::string("locus: ") + locus::to_string(e.kind()) + ": " + e.message();
      // A message may quote bytes that are not UTF-8 (a file name, a damaged file's text): they are
      // escaped (\xff), not turned into a UnicodeDecodeError that loses the message.
      PyObject* text = PyUnicode_DecodeUTF8(msg.data(), static_cast<Py_ssize_t>(msg.size()), "backslashreplace");
      if (!text) return; // the decode's own error (out of memory) stands
      PyErr_SetObject(type, text);
      Py_DECREF(text);
    }
  });

  m.def(
      "rebalance_experts",
      [](nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> weight, nb::handle replicas_arg,
         nb::handle groups_arg, nb::handle nodes_arg, nb::handle gpus_arg) {
        const std::size_t layers = weight.shape(0), experts = weight.shape(1);
        const std::size_t num_replicas = size_arg(replicas_arg, "num_replicas");
        const std::size_t num_groups = size_arg(groups_arg, "num_groups"), num_nodes = size_arg(nodes_arg, "num_nodes");
        const std::size_t num_gpus = size_arg(gpus_arg, "num_gpus");
        auto r = interruptible([&] {
          return locus::placement::rebalance_experts(std::span(weight.data(), layers * experts), layers, experts,
                                                     num_replicas, num_groups, num_nodes, num_gpus);
        });
        return nb::make_tuple(owned(std::move(r.physical_to_logical), {layers, num_replicas}),
                              owned(std::move(r.logical_to_physical), {layers, experts, r.max_replicas}),
                              owned(std::move(r.logical_count), {layers, experts}));
      },
      "weight"_a, "num_replicas"_a, "num_groups"_a, "num_nodes"_a, "num_gpus"_a);

  nb::class_<locus::trace::trace>(m, "Trace")
      .def_prop_ro("experts", &locus::trace::trace::experts)
      .def_prop_ro("top_k", &locus::trace::trace::top_k)
      .def_prop_ro("layers", &locus::trace::trace::layers)
      .def_prop_ro("tokens", &locus::trace::trace::tokens)
      .def_prop_ro("requests", &locus::trace::trace::requests)
      // Names as read (an ESFT folder's may be any bytes): not UTF-8 bytes come back as surrogate
      // escapes, as os.fsdecode gives a file name, and go back to the same bytes.
      .def_prop_ro("domains", [](const locus::trace::trace& t) { return python_strings(t.domains()); })
      .def_prop_ro("request_ids",
                   [](const locus::trace::trace& t) {
                     std::vector<std::uint64_t> ids(t.requests());
                     for (std::size_t r = 0; r < ids.size(); ++r)
                       ids[r] = t.request(r).id;
                     return ids;
                   })
      .def_prop_ro("request_names",
                   [](const locus::trace::trace& t) {
                     std::vector<std::string> names;
                     for (std::size_t r = 0; t.has_request_names() && r < t.requests(); ++r)
                       names.push_back(t.request_name(r));
                     return python_strings(names);
                   })
      .def_prop_ro("model_layer_ids", &locus::trace::trace::model_layer_ids)
      .def_prop_ro("has_model_layers", &locus::trace::trace::has_model_layers)
      .def_prop_ro("hidden_layers", &locus::trace::trace::hidden_layers)
      .def(
          "layer_ids",
          [](const locus::trace::trace& t, nb::handle layer) {
            // Named as the argument's range ("trace::layer: layer 5 out of range" named a C++ function).
            const auto v = t.layer(static_cast<std::size_t>(count_arg(layer, "layer", t.layers() - 1)));
            return nb::ndarray<nb::numpy, const locus::trace::trace_expert_id>(v.ids(), {t.tokens(), t.top_k()},
                                                                               nb::handle());
          },
          "layer"_a.none(), nb::rv_policy::reference_internal)
      .def(
          "with_prefill_tokens",
          [](const locus::trace::trace& t, nb::handle tokens) {
            const std::size_t n = size_arg(tokens, "tokens");
            return interruptible([&] { return t.with_prefill_tokens(n); });
          },
          "tokens"_a.none())
      // (prefill, decode, unknown) token counts: plan and simulate refuse a trace without phases
      // in words a Python user can act on, rather than fitting nothing or reporting zeros.
      .def("_phase_counts",
           [](const locus::trace::trace& t) {
             const auto prefill =
                 static_cast<std::size_t>(std::ranges::count(t.phases(), locus::trace::phase::prefill));
             const auto decode = static_cast<std::size_t>(std::ranges::count(t.phases(), locus::trace::phase::decode));
             return std::make_tuple(prefill, decode, t.tokens() - prefill - decode);
           })
      .def("__getstate__", &trace_state)
      .def("__setstate__", &set_trace_state, "state"_a.none())
      .def("__repr__", [](const locus::trace::trace& t) {
        return locus::detail::concat("Trace(requests=", t.requests(), ", tokens=", t.tokens(), ", layers=", t.layers(),
                                     ", experts=", t.experts(), ", top_k=", t.top_k(), ")");
      });
  m.def("_trace_from_arrays", &trace_from_arrays, "ids"_a, "experts"_a, "weights"_a, "requests"_a, "phases"_a,
        "domains"_a, "domain_names"_a, "layer_ids"_a, "hidden_layers"_a, "request_names"_a);
  m.def(
      "read_trace",
      [](nb::handle path) { return file_io(path, [&](const std::string& p) { return locus::trace::read_trace(p); }); },
      "path"_a.none());
  m.def(
      "write_trace",
      [](const locus::trace::trace& t, nb::handle path) {
        file_io(path, [&](const std::string& p) { locus::trace::write_trace(t, p); });
      },
      "trace"_a, "path"_a.none());
  m.def(
      "import_esft",
      [](nb::handle path, nb::handle experts) {
        locus::trace::esft_options opt; // top-6, as `locus trace import` reads ESFT folders
        opt.experts = size_arg(experts, "experts");
        locus::trace::esft_report rep;
        auto t = file_io(path, [&](const std::string& p) { return locus::trace::import_esft(p, opt, &rep); });
        // A sub-folder without layer files is no domain: an empty domain folder would go unnoticed.
        for (const auto& f : rep.skipped_folders) {
          const auto msg = locus::detail::concat("locus: ", f,
                                                 " holds no expert_weights_<n>.txt file; it is no "
                                                 "domain of the trace");
          if (PyErr_WarnEx(PyExc_UserWarning, msg.c_str(), 1) < 0) throw nb::python_error();
        }
        return t;
      },
      "path"_a.none(), "experts"_a = 64);
  m.def(
      "split_by_request",
      [](const locus::trace::trace& t, double test_fraction, nb::handle seed) {
        const std::uint64_t s = count_arg(seed, "seed");
        return interruptible([&] { return locus::trace::split_by_request(t, test_fraction, s); });
      },
      "trace"_a, "test_fraction"_a, "seed"_a.none());
  m.def(
      "_write_text",
      [](nb::handle path, const std::string& text) {
        file_io(path, [&](const std::string& p) { locus::write_file_atomically(p, text); });
      },
      "path"_a.none(), "text"_a);

  m.def(
      "expert_load",
      [](const locus::trace::trace& t, bool decode_only) {
        // A pass over every token of every layer: without the GIL (the trace is read only).
        auto flat = interruptible([&] {
          std::vector<double> out;
          out.reserve(t.layers() * t.experts());
          for (const auto& row : locus::placement::expert_load(t, decode_only))
            out.insert(out.end(), row.begin(), row.end());
          return out;
        });
        return owned(std::move(flat), {t.layers(), t.experts()});
      },
      "trace"_a, "decode_only"_a = false);
  // TensorRT-LLM expert statistics, read by the library's reader (locus.engines wraps it).
  m.def(
      "_import_trtllm_statistics",
      [](nb::handle path, nb::handle iter_start, nb::handle iter_stop) {
        locus::placement::iteration_window w;
        if (!iter_start.is_none()) w.begin = count_arg(iter_start, "iter_start");
        if (!iter_stop.is_none()) w.end = count_arg(iter_stop, "iter_stop");
        LOCUS_REQUIRE(iter_start.is_none() || iter_stop.is_none() || w.begin < w.end, locus::config_error,
                      "iter_start ", w.begin, " is not below iter_stop ", w.end);
        auto got = file_io(path, [&](const std::string& p) { return locus::placement::import_load(p, 0, w); });
        const std::size_t experts = got.load.front().size(); // import_load refuses a folder without loads
        std::vector<double> flat;
        for (const auto& row : got.load)
          flat.insert(flat.end(), row.begin(), row.end());
        std::vector<std::size_t> ids(got.layer_ids.begin(), got.layer_ids.end());
        return std::make_pair(ids, owned(std::move(flat), {got.load.size(), experts}));
      },
      "path"_a.none(), "iter_start"_a.none(), "iter_stop"_a.none());
  m.def(
      "layer_imbalance",
      [](const locus::trace::trace& t) {
        const auto imb =
            interruptible([&] { return locus::trace::layer_imbalance(locus::trace::compute_expert_load(t)); });
        nb::list out;
        for (const auto& i : imb) {
          nb::dict d;
          d["max_over_mean"] = i.max_over_mean;
          d["cv"] = i.cv;
          d["gini"] = i.gini;
          out.append(d);
        }
        return out;
      },
      "trace"_a);

  m.def(
      "_redundant_slots_for_total",
      [](nb::handle experts, nb::handle ranks, nb::handle total) {
        return locus::placement::redundant_slots_for_total(size_arg(experts, "experts"), size_arg(ranks, "ranks"),
                                                           size_arg(total, "redundant_experts"));
      },
      "experts"_a, "ranks"_a, "total"_a);

  m.def(
      "_plan_from_load",
      [](load_in load, nb::handle nodes, nb::handle gpus_per_node, nb::handle slots_per_rank,
         nb::handle redundant_slots, const std::string& placement, nb::handle eplb_groups) {
        const auto names = locus::placement::planner_names();
        if (std::find(names.begin(), names.end(), placement) == names.end()) {
          std::string known; // a typo is named as one, not as a planner that needs a trace
          for (const auto& n : names)
            known += (known.empty() ? "" : ", ") + n;
          LOCUS_THROW(locus::config_error, "unknown placement \"", placement, "\" (known: ", known, ")");
        }
        LOCUS_REQUIRE(placement == "linear" || placement == "round_robin" || placement == "eplb", locus::config_error,
                      "planning from loads: placement \"", placement,
                      "\" needs a trace (from loads: linear, round_robin or eplb)");
        locus::placement::plan_input in;
        in.topology = locus::dynamic_topology(size_arg(nodes, "nodes"), size_arg(gpus_per_node, "gpus_per_node"));
        in.experts = load.shape(1);
        // Without slots_per_rank, the rule a trace plan follows (every GPU serves an expert).
        in.slots_per_rank = slots_per_rank.is_none()
                                ? locus::placement::slots_for(in.experts, in.topology.ranks(),
                                                              size_arg(redundant_slots, "redundant_slots"))
                                : size_arg(slots_per_rank, "slots_per_rank");
        locus::placement::named_plan_options opt;
        opt.eplb_groups = size_arg(eplb_groups, "eplb_groups");
        // Seconds for a large table (the load is copied and planned without the GIL; the array stays
        // alive through the call, and its data is only read).
        auto maps = interruptible([&] {
          in.load = load_from(load);
          return locus::placement::plan_by_name(placement, in, opt);
        });
        return maps_to(maps);
      },
      "load"_a, "nodes"_a, "gpus_per_node"_a, "slots_per_rank"_a.none(), "redundant_slots"_a, "placement"_a,
      "eplb_groups"_a);

  nb::class_<locus::grouper::workload_model>(m, "WorkloadModel")
      .def_prop_ro("clusters", &locus::grouper::workload_model::clusters)
      .def_prop_ro("nodes", &locus::grouper::workload_model::nodes)
      .def_prop_ro("layers", &locus::grouper::workload_model::layers)
      .def_prop_ro("experts", &locus::grouper::workload_model::experts)
      .def_prop_ro("cluster_node", &locus::grouper::workload_model::cluster_node)
      .def(
          "save",
          [](const locus::grouper::workload_model& g, nb::handle path) {
            file_io(path, [&](const std::string& p) { locus::grouper::save_grouping(p, g); });
          },
          "path"_a.none())
      .def(
          "classify",
          [](const locus::grouper::workload_model& g, nb::handle trace_arg, nb::handle prefill_arg) {
            if (!nb::isinstance<locus::trace::trace>(trace_arg))
              throw nb::type_error(locus::detail::concat("trace is ", short_repr(trace_arg), " (",
                                                         Py_TYPE(trace_arg.ptr())->tp_name, "), expected a locus.Trace")
                                       .c_str());
            const auto& t = nb::cast<const locus::trace::trace&>(trace_arg);
            // As plan and replan: with none, no request would ever be recognised.
            const auto prefill_tokens =
                static_cast<std::size_t>(count_arg(prefill_arg, "prefill_tokens", UINT64_MAX, 1));
            // A pass over every request of the trace: without the GIL (the model and the trace are read only).
            auto out = interruptible([&] {
              std::vector<std::int64_t> cluster(t.requests());
              std::vector<std::uint32_t> scratch;
              for (std::size_t r = 0; r < t.requests(); ++r) {
                const auto c = g.classify(t, r, prefill_tokens, scratch);
                cluster[r] = c.confident ? static_cast<std::int64_t>(c.cluster) : -1;
              }
              return cluster;
            });
            return owned(std::move(out), {t.requests()});
          },
          "trace"_a.none(), "prefill_tokens"_a.none())
      .def("__getstate__", &model_state)
      .def("__setstate__", &set_model_state, "state"_a.none());
  m.def(
      "load_grouping",
      [](nb::handle path) {
        return std::make_shared<locus::grouper::workload_model>(
            file_io(path, [](const std::string& p) { return locus::grouper::load_grouping(p); }));
      },
      "path"_a.none());
  m.def(
      "_plan_from_trace",
      [](const locus::trace::trace& train, nb::handle nodes, nb::handle gpus_per_node, const std::string& placement,
         nb::handle redundant_slots, nb::handle eplb_groups, nb::handle clusters, nb::handle seed,
         nb::handle prefill_tokens, nb::handle hedge_replicas, const std::string& copies, nb::handle anneal,
         double fill_slack, double hedge_class_spread, nb::handle hedge_cost_budget) {
        locus::placement::activation_plan_options opt;
        if (!hedge_replicas.is_none()) opt.refine.hedge_replicas = size_arg(hedge_replicas, "hedge_replicas");
        // The planner refuses a spread or a budget out of range (NaN included).
        opt.refine.hedge_class_spread = hedge_class_spread;
        if (!hedge_cost_budget.is_none()) opt.refine.hedge_cost_budget = nb::cast<double>(hedge_cost_budget);
        opt.refine.count(locus::placement::parse_copy_count(copies));
        opt.refine.anneal_per_expert = size_arg(anneal, "anneal");
        opt.refine.fill_slack = fill_slack; // the planner refuses a negative or non-finite one
        opt.named.eplb_groups = size_arg(eplb_groups, "eplb_groups");
        opt.grouping.clusters = size_arg(clusters, "clusters");
        opt.grouping.seed = count_arg(seed, "seed");
        opt.grouping.prefill_tokens = size_arg(prefill_tokens, "prefill_tokens");
        const auto topo = locus::dynamic_topology(size_arg(nodes, "nodes"), size_arg(gpus_per_node, "gpus_per_node"));
        const std::size_t redundant = size_arg(redundant_slots, "redundant_slots");
        // Seconds to minutes (anneal): the trace is read only, and the plan's model is new.
        const auto plan = interruptible(
            [&] { return locus::placement::plan_activation_aware(train, topo, placement, redundant, opt); });
        // The hedge count as `locus plan --json` gives it (hedge_copies): the maps alone do not tell
        // a balance hedge from a replica that saves bytes.
        return std::make_tuple(maps_to(plan.maps), std::const_pointer_cast<locus::grouper::workload_model>(plan.model),
                               plan.hedge_copies);
      },
      "train"_a, "nodes"_a, "gpus_per_node"_a, "placement"_a, "redundant_slots"_a, "eplb_groups"_a, "clusters"_a,
      "seed"_a, "prefill_tokens"_a, "hedge_replicas"_a.none(), "copies"_a, "anneal"_a, "fill_slack"_a,
      "hedge_class_spread"_a, "hedge_cost_budget"_a.none());

  m.def(
      "_simulate",
      [](const locus::trace::trace& test, maps_in maps, nb::handle nodes, nb::handle gpus_per_node,
         const std::string& grouper, std::shared_ptr<locus::grouper::workload_model> model,
         const std::string& transport, nb::handle batch_per_rank, nb::handle hidden, double arrival_rate,
         nb::handle seed, const std::string& replica_rule, double replica_slack, double expert_read_us,
         nb::handle balance_window) {
        // A NaN slack would compare false everywhere: no GPU would ever count as hot.
        LOCUS_REQUIRE(std::isfinite(replica_slack) && replica_slack >= 0, locus::config_error, "replica_slack is ",
                      replica_slack, ", expected a finite number >= 0");
        locus::cost::simulation_config cfg;
        cfg.replica_rule = locus::transport::parse_replica_rule(replica_rule);
        cfg.replica_slack = replica_slack;
        cfg.topology = locus::dynamic_topology(size_arg(nodes, "nodes"), size_arg(gpus_per_node, "gpus_per_node"));
        cfg.transport = locus::cost::parse_transport_kind(transport);
        // As `locus simulate --hidden` takes it: 0 reported zero bytes as if they were results.
        const auto hidden_size = static_cast<std::size_t>(count_arg(hidden, "hidden", std::uint64_t{1} << 24, 1));
        cfg.sizes = locus::cost::message_sizes::fp8_dispatch_bf16_combine(hidden_size);
        cfg.batch_per_rank = static_cast<std::size_t>(count_arg(batch_per_rank, "batch_per_rank", UINT64_MAX, 1));
        cfg.arrival_rate = arrival_rate;
        cfg.links.expert_read_us = expert_read_us; // checked by the simulator (link_model::validate)
        cfg.seed = count_arg(seed, "seed");
        cfg.balance_window = size_arg(balance_window, "balance_window");
        // The run goes on without the GIL: another thread may simulate with the same model meanwhile
        // (a grouper keeps its classifying scratch itself; the model is read only).
        auto g = locus::grouper::grouper_by_name(grouper, model);
        const auto map_list = maps_from(maps, test.experts());
        return interruptible([&] {
          return locus::cost::simulation_summary_json(locus::cost::simulate_decode(test, map_list, g, cfg)).dump();
        });
      },
      "test"_a, "maps"_a, "nodes"_a, "gpus_per_node"_a, "grouper"_a, "model"_a.none(), "transport"_a,
      "batch_per_rank"_a, "hidden"_a, "arrival_rate"_a, "seed"_a, "replica_rule"_a, "replica_slack"_a,
      "expert_read_us"_a, "balance_window"_a);

  m.def(
      "_replan",
      [](maps_in maps, nb::handle experts, nb::handle nodes, nb::handle gpus_per_node,
         const locus::trace::trace& window,
         std::optional<nb::ndarray<const std::int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>> homes,
         std::shared_ptr<locus::grouper::workload_model> model, const locus::trace::trace* prior,
         std::optional<double> budget, double prior_requests, const std::string& transport, double replan_slack,
         nb::handle expert_bytes, nb::handle prefill_tokens, std::vector<std::size_t> map_layers,
         const std::string& replica_rule) {
        const auto topo = locus::dynamic_topology(size_arg(nodes, "nodes"), size_arg(gpus_per_node, "gpus_per_node"));
        // With none, no request's class is recognised.
        const auto prefill = static_cast<std::size_t>(count_arg(prefill_tokens, "prefill_tokens", UINT64_MAX, 1));
        // Each request's node: its rank in `homes`, else its class's under the model, else in turn.
        const auto nodes_of = [&](const locus::trace::trace& t, bool use_homes) {
          std::vector<std::uint32_t> out(t.requests());
          if (use_homes) {
            LOCUS_REQUIRE(homes->shape(0) == t.requests(), locus::config_error, "homes has ", homes->shape(0),
                          " ranks for the window's ", t.requests(), " requests");
            for (std::size_t r = 0; r < t.requests(); ++r) {
              const std::int64_t rank = homes->data()[r];
              LOCUS_REQUIRE(rank >= 0 && static_cast<std::uint64_t>(rank) < topo.ranks(), locus::config_error, "homes[",
                            r, "] is rank ", rank, " of ", topo.ranks());
              out[r] = static_cast<std::uint32_t>(topo.node_of(static_cast<std::size_t>(rank)));
            }
            return out;
          }
          return locus::placement::assumed_request_nodes(t, model.get(), topo.nodes(), prefill);
        };
        LOCUS_REQUIRE(!model || model->nodes() == topo.nodes(), locus::config_error, "the grouping model is for ",
                      model ? model->nodes() : 0, " nodes; the plan has ", topo.nodes());
        locus::placement::live_replan_options opt;
        // A NaN would pass every comparison the re-planner makes with it.
        LOCUS_REQUIRE(std::isfinite(prior_requests) && prior_requests >= 0, locus::config_error, "prior_requests (",
                      prior_requests, ") must be a finite number >= 0");
        LOCUS_REQUIRE(std::isfinite(replan_slack) && replan_slack >= 0, locus::config_error, "replan_slack (",
                      replan_slack, ") must be a finite number >= 0");
        opt.prior_requests = prior_requests;
        opt.replan_slack = replan_slack;
        opt.copies = locus::placement::parse_copy_count(transport);
        opt.replicas = locus::transport::parse_replica_rule(replica_rule);
        opt.expert_bytes = count_arg(expert_bytes, "expert_bytes", locus::placement::max_expert_bytes);
        const auto current = maps_from(maps, size_arg(experts, "experts"));
        opt.budget_share = budget ? *budget : locus::placement::default_budget_for(current);
        locus::placement::require_replan_shape(current, window, topo, map_layers);
        if (prior) locus::placement::require_replan_shape(current, *prior, topo, map_layers, "prior");
        const auto window_nodes = nodes_of(window, homes.has_value());
        const auto prior_nodes = prior ? nodes_of(*prior, false) : std::vector<std::uint32_t>{};
        // The nodes are known: the model is not read again.
        const auto r = interruptible([&] {
          return locus::placement::replan_live(current, window, window_nodes, topo, opt, prior, prior_nodes);
        });
        return std::make_pair(maps_to(r.maps), locus::placement::live_replan_json(r).dump());
      },
      "maps"_a, "experts"_a, "nodes"_a, "gpus_per_node"_a, "window"_a, "homes"_a.none(), "model"_a.none(),
      "prior"_a.none(), "budget"_a.none(), "prior_requests"_a, "transport"_a, "replan_slack"_a, "expert_bytes"_a,
      "prefill_tokens"_a, "map_layers"_a, "replica_rule"_a);

  m.def(
      "_keep_slots_in_place",
      [](maps_in before, maps_in after, nb::handle experts) {
        const std::size_t e = size_arg(experts, "experts");
        return maps_to(interruptible(
            [&] { return locus::placement::keep_slots_in_place(maps_from(before, e), maps_from(after, e)); }));
      },
      "before"_a, "after"_a, "experts"_a);

  m.def(
      "_fill_empty_slots",
      [](maps_in maps, nb::handle experts, load_in load, nb::handle gpus_per_node) {
        const std::size_t e = size_arg(experts, "experts"), g = size_arg(gpus_per_node, "gpus_per_node");
        return maps_to(interruptible(
            [&] { return locus::placement::fill_empty_slots(maps_from(maps, e), load_from(load), {}, g); }));
      },
      "maps"_a, "experts"_a, "load"_a, "gpus_per_node"_a);
  m.def(
      "_export_text",
      [](maps_in maps, nb::handle experts, const std::string& to, nb::handle layer_ids, nb::handle hidden_layers,
         nb::handle mtp_layers) {
        const std::size_t e = size_arg(experts, "experts");
        // The ids are always given (the Python layer numbers the layers); an empty list is wrong.
        locus::placement::model_layers layers{counts_arg(layer_ids, "layer_ids"),
                                              size_arg(hidden_layers, "num_hidden_layers")};
        layers.mtp_layers = static_cast<std::size_t>(
            count_arg(mtp_layers, "mtp_layers", locus::placement::model_layers::max_mtp_layers));
        const auto format = locus::placement::parse_engine_format(to);
        // A plan of many layers exports to megabytes of text: without the GIL.
        return interruptible([&] { return locus::placement::export_text(format, maps_from(maps, e), layers); });
      },
      "maps"_a, "experts"_a, "to"_a, "layer_ids"_a, "hidden_layers"_a, "mtp_layers"_a);
  // The model layer the planned MoE layers' numbering goes on at, past the plan (0: none); see
  // model_layers::unplanned_layer.
  m.def(
      "_unplanned_layer",
      [](nb::handle layer_ids, nb::handle hidden_layers, nb::handle mtp_layers) {
        locus::placement::model_layers layers{counts_arg(layer_ids, "layer_ids"),
                                              size_arg(hidden_layers, "num_hidden_layers")};
        layers.mtp_layers = static_cast<std::size_t>(
            count_arg(mtp_layers, "mtp_layers", locus::placement::model_layers::max_mtp_layers));
        return layers.unplanned_layer();
      },
      "layer_ids"_a, "hidden_layers"_a, "mtp_layers"_a);
  m.def(
      "_load_expert_maps",
      [](nb::handle path) {
        const auto plan = file_io(path, [&](const std::string& p) { return locus::load_expert_plan(p); });
        return nb::make_tuple(maps_to(plan.maps), plan.maps.front().experts(), plan.model_layers, plan.hidden_layers,
                              plan.gpus_per_node);
      },
      "path"_a.none());
  m.def(
      "_save_expert_maps",
      [](nb::handle path, maps_in maps, nb::handle experts, nb::handle layer_ids, nb::handle hidden_layers,
         nb::handle gpus_per_node) {
        const std::size_t e = size_arg(experts, "experts");
        auto ids = counts_arg(layer_ids, "layer_ids");
        const std::size_t hidden = size_arg(hidden_layers, "hidden_layers"),
                          g = size_arg(gpus_per_node, "gpus_per_node");
        const std::string text = interruptible([&] {
          return locus::expert_plan_text({maps_from(maps, e), std::move(ids), hidden, g});
        });
        file_io(path, [&](const std::string& p) { locus::write_file_atomically(p, text); });
      },
      "path"_a.none(), "maps"_a, "experts"_a, "layer_ids"_a, "hidden_layers"_a, "gpus_per_node"_a);
}
