// The CUDA backend's host side: allocates the state arena and the device tables once when the
// optimizer is created, queues a step as a fixed sequence of launches on the optimizer's stream
// (no host round trip, so it can be captured in a CUDA graph), and moves state and counters
// between host and device for save, load and inspection.
//
// NOTE: every copy and memset goes to the optimizer's own stream. Synchronous cudaMemcpy/cudaMemset
// run on the legacy default stream, which a cudaStreamNonBlocking stream is not ordered after, and
// a pageable host-to-device cudaMemcpy may return before its data lands.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <cstddef>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "nibble/device.hpp"
#include "optim/cuda/common.cuh"
#include "optim/cuda/newton_schulz.cuh"
#include "optim/impl.hpp"
#include "optim/state_layout.hpp"

namespace nibble::cuda {

struct DeviceState {
  cudaStream_t stream = nullptr;
  std::byte* arena = nullptr;
  std::int64_t arena_bytes = 0;
  std::vector<void*> allocations;
  Tables tb{};
  StepConfig cfg{};
  std::vector<DTensor> tensors;  // host copy of tb.tensors
  bool norm = false;
  int2* rank1_slots = nullptr;
  int rank1_count = 0;
  const float** hessian_ptrs = nullptr;
  void* staging = nullptr;          // pinned copy of the tensor table for eager uploads (set_grads)
  void* capture_staging = nullptr;  // the same for uploads captured in a CUDA graph
  cudaEvent_t staging_done = nullptr;
  // Muon: its matrices by shape, and the cuBLAS handle and workspace of their Newton-Schulz GEMMs
  // (a workspace of its own, so that a captured step allocates nothing).
  std::vector<NsBatch> ns_batches;
  cublasHandle_t cublas = nullptr;
  void* cublas_workspace = nullptr;
  // enqueue_grad_square_sum's counted flags: on the device, and the host copy they were made from.
  std::uint8_t* counted = nullptr;
  std::vector<std::uint8_t> counted_host;

  ~DeviceState() {
    if (cublas != nullptr) cublasDestroy(cublas);
    if (staging_done != nullptr) cudaEventSynchronize(staging_done);
    cudaFreeHost(staging);
    cudaFreeHost(capture_staging);
    if (staging_done != nullptr) cudaEventDestroy(staging_done);
    for (void* p : allocations) cudaFree(p);
    cudaFree(arena);
  }
};

namespace {

DeviceState& state(const Optimizer::Impl& impl);  // the CUDA backend's, defined below

void* device_alloc(DeviceState& ds, std::size_t bytes, const char* what) {
  void* p = nullptr;
  if (bytes == 0) return nullptr;
  if (const cudaError_t error = cudaMalloc(&p, bytes); error != cudaSuccess) {
    cudaGetLastError();
    std::size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) cudaGetLastError();  // no stale error for later checks
    if (error == cudaErrorMemoryAllocation)
      throw OutOfMemory("out of GPU memory: the optimizer's " + std::string(what) + " needs " + std::to_string(bytes) +
                            " bytes, " + std::to_string(free) + " are free",
                        static_cast<long long>(bytes), static_cast<long long>(free));
    throw_cuda("cudaMalloc", error, __FILE__, __LINE__);
  }
  ds.allocations.push_back(p);
  return p;
}

// Queued on the optimizer's stream: `values` must live until the stream is synchronised.
template <class T>
T* upload_vector(DeviceState& ds, const std::vector<T>& values, const char* what) {
  if (values.empty()) return nullptr;
  auto* p = static_cast<T*>(device_alloc(ds, values.size() * sizeof(T), what));
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(p, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice, ds.stream));
  return p;
}

template <class T>
T* zeroed(DeviceState& ds, std::size_t count, const char* what) {
  if (count == 0) return nullptr;
  auto* p = static_cast<T*>(device_alloc(ds, count * sizeof(T), what));
  NIBBLE_CUDA_CHECK(cudaMemsetAsync(p, 0, count * sizeof(T), ds.stream));
  return p;
}

// A copy the host waits for: done (and `host` free again) when this returns.
void copy_and_wait(DeviceState& ds, void* to, const void* from, std::size_t bytes, cudaMemcpyKind kind) {
  if (bytes > 0) NIBBLE_CUDA_CHECK(cudaMemcpyAsync(to, from, bytes, kind, ds.stream));
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(ds.stream));
}

// Queues the upload of the host's tensor table (ds.tensors) on the optimizer's stream.
void upload_tensor_table(DeviceState& ds) {
  const std::size_t bytes = ds.tensors.size() * sizeof(DTensor);
  if (bytes == 0) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  NIBBLE_CUDA_CHECK(cudaStreamIsCapturing(ds.stream, &capture));
  if (capture == cudaStreamCaptureStatusActive) {
    // NOTE: inside a capture the host may not wait, and the graph copies from its pinned source
    // each time it replays, so a capture has a buffer of its own that eager uploads never touch.
    std::memcpy(ds.capture_staging, ds.tensors.data(), bytes);
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(ds.tb.tensors, ds.capture_staging, bytes, cudaMemcpyHostToDevice, ds.stream));
    return;
  }
  // The previous eager upload must have left the staging buffer before it is overwritten.
  NIBBLE_CUDA_CHECK(cudaEventSynchronize(ds.staging_done));
  std::memcpy(ds.staging, ds.tensors.data(), bytes);
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(ds.tb.tensors, ds.staging, bytes, cudaMemcpyHostToDevice, ds.stream));
  NIBBLE_CUDA_CHECK(cudaEventRecord(ds.staging_done, ds.stream));
}

// A parameter or gradient must be memory the GPU can address.
void check_device_pointer(const void* p, const std::string& what) {
  if (p == nullptr) return;
  cudaPointerAttributes attributes{};
  const cudaError_t error = cudaPointerGetAttributes(&attributes, p);
  if (error != cudaSuccess) {
    cudaGetLastError();
    throw InvalidArgument(what + " is not a pointer the CUDA runtime knows (" + cudaGetErrorName(error) + ")");
  }
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
    throw InvalidArgument(what + " is host memory; a CUDA optimizer steps device arrays");
}

std::uint8_t element_type(DType dtype) {
  if (dtype == DType::BF16) return kBF16;
  if (dtype == DType::F16) return kF16;
  return kF32;
}

DTensor describe(const TensorState& t) {
  DTensor d;
  d.param = t.param.data;
  d.grad = t.param.grad;
  d.master = t.master;
  d.af_row = t.af_row;
  d.af_col = t.af_col;
  d.numel = t.numel;
  d.rows = t.rows;
  d.cols = t.cols;
  d.batch_rows = t.batch_rows;
  d.offset = t.offset;
  d.lr = t.lr;
  d.weight_decay = t.weight_decay;
  d.block = t.block;
  d.slot_count = t.slot_count;
  d.param_type = element_type(t.param.dtype);
  d.grad_type = element_type(t.param.grad_dtype);
  d.factored = t.factored ? 1 : 0;
  for (int j = 0; j < t.slot_count; ++j) {
    const Slot& s = t.slots[j];
    DSlot& o = d.slots[j];
    switch (s.storage) {
      case math::StateStorage::kF32: o.data = s.f32; break;
      case math::StateStorage::kBf16: o.data = s.bf16; break;
      case math::StateStorage::kCodes8:
      case math::StateStorage::kCodes4: o.data = s.codes; break;
    }
    o.absmax = s.absmax;
    o.row_max = s.row_max;
    o.col_max = s.col_max;
    o.next_row_max = s.next_row_max;
    o.next_col_max = s.next_col_max;
    o.storage = s.storage;
    o.codebook = static_cast<std::uint8_t>(s.codebook);
    o.rank1 = s.rank1 ? 1 : 0;
  }
  return d;
}

std::byte* allocate_arena(Optimizer::Impl& impl, DeviceState& ds, std::int64_t bytes) {
  ds.stream = static_cast<cudaStream_t>(impl.options.cuda_stream);
  ds.arena_bytes = bytes;
  if (bytes > 0) {
    void* p = nullptr;
    ds.allocations.reserve(16);
    if (const cudaError_t error = cudaMalloc(&p, static_cast<std::size_t>(bytes)); error != cudaSuccess) {
      cudaGetLastError();
      std::size_t free = 0, total = 0;
      if (cudaMemGetInfo(&free, &total) != cudaSuccess) cudaGetLastError();  // no stale error for later checks
      if (error == cudaErrorMemoryAllocation)
        throw OutOfMemory("out of GPU memory: the optimizer state needs " + std::to_string(bytes) + " bytes, " +
                              std::to_string(free) + " are free",
                          bytes, static_cast<long long>(free));
      throw_cuda("cudaMalloc", error, __FILE__, __LINE__);
    }
    ds.arena = static_cast<std::byte*>(p);
    NIBBLE_CUDA_CHECK(cudaMemsetAsync(p, 0, static_cast<std::size_t>(bytes), ds.stream));
  }
  return ds.arena;
}

// Muon: the lr factor of an orthogonalised matrix, of its (shape[0], rest) view.
float muon_factor(const Hyper& hyper, const TensorState& t) {
  const std::int64_t rows = t.param.shape[0];
  return static_cast<float>(math::muon_lr_factor(hyper.adjust_lr, static_cast<double>(rows),
                                                 static_cast<double>(t.numel / rows)));
}

// Muon: an fp32 update buffer for every orthogonalised matrix (in ds.tensors), and its matrices
// grouped by shape into batches with their bf16 Newton-Schulz operands: the bytes
// muon_scratch_bytes counts.
void create_muon(const Optimizer::Impl& impl, DeviceState& ds) {
  std::int64_t total = 0;
  std::vector<std::pair<std::pair<std::int64_t, std::int64_t>, std::vector<int>>> shapes;
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    const TensorState& t = impl.tensors[i];
    if (!t.orthogonalised || t.numel == 0) continue;
    const std::int64_t rows = t.param.shape[0], cols = t.numel / rows;
    total += t.numel;
    auto it = std::find_if(shapes.begin(), shapes.end(), [&](const auto& e) { return e.first == std::make_pair(rows, cols); });
    if (it == shapes.end()) it = shapes.insert(shapes.end(), {{rows, cols}, {}});
    it->second.push_back(static_cast<int>(i));
  }
  if (total == 0) return;
  float* updates = zeroed<float>(ds, static_cast<std::size_t>(total), "Muon updates");
  std::int64_t offset = 0;
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    const TensorState& t = impl.tensors[i];
    if (!t.orthogonalised || t.numel == 0) continue;
    DTensor& d = ds.tensors[i];
    d.muon_update = updates + offset;
    d.muon_cols = t.numel / t.param.shape[0];
    d.muon_factor = muon_factor(impl.hyper, t);
    offset += t.numel;
  }
  for (const auto& [shape, members] : shapes) {
    // The matrices of a batch are the y dimension of its kernels' grids.
    if (members.size() > 65535)
      throw InvalidArgument("Muon on CUDA: " + std::to_string(members.size()) + " matrices of shape (" +
                            std::to_string(shape.first) + ", " + std::to_string(shape.second) +
                            ") exceed the 65535 one batch can step; give some of them a different optimizer");
    NsBatch b;
    b.rows = shape.first;
    b.cols = shape.second;
    b.tall = b.rows > b.cols ? 1 : 0;
    b.s = std::min(b.rows, b.cols);
    b.l = std::max(b.rows, b.cols);
    b.count = static_cast<int>(members.size());
    const auto n = static_cast<std::size_t>(b.count);
    b.tensors = upload_vector(ds, members, "Muon batch");
    b.norm_blocks = static_cast<int>(muon_norm_blocks(b.rows * b.cols));
    b.partials = zeroed<double>(ds, n * static_cast<std::size_t>(b.norm_blocks), "Muon norm partials");
    b.norms = zeroed<double>(ds, n, "Muon norms");
    b.x = zeroed<__nv_bfloat16>(ds, n * static_cast<std::size_t>(b.s * b.l), "Newton-Schulz X");
    b.y = zeroed<__nv_bfloat16>(ds, n * static_cast<std::size_t>(b.s * b.l), "Newton-Schulz X");
    b.a = zeroed<__nv_bfloat16>(ds, n * static_cast<std::size_t>(b.s * b.s), "Newton-Schulz A");
    b.b = zeroed<__nv_bfloat16>(ds, n * static_cast<std::size_t>(b.s * b.s), "Newton-Schulz B");
    ds.ns_batches.push_back(b);
  }
  check_cublas(cublasCreate(&ds.cublas), "cublasCreate");
  const auto workspace = static_cast<std::size_t>(kCublasWorkspaceBytes);
  ds.cublas_workspace = device_alloc(ds, workspace, "cuBLAS workspace");
  bind_cublas(ds.cublas, ds.stream, ds.cublas_workspace, workspace);
  // The batches' tensor lists are uploaded from `shapes`, which ends here.
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(ds.stream));
}

void create(Optimizer::Impl& impl) {
  DeviceState& ds = state(impl);
  const Algorithm algorithm = impl.options.algorithm;
  const bool adamp = algorithm == Algorithm::kAdamP, adafactor = algorithm == Algorithm::kAdafactor;
  std::vector<DChunk> chunks, segments;
  std::vector<DColItem> col_items;
  std::vector<int2> rank1;
  std::int64_t scratch_doubles = 0, col_partials = 0;
  std::vector<std::int64_t> scratch_offsets;
  ds.tensors.clear();
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    const TensorState& t = impl.tensors[i];
    check_device_pointer(t.param.data, "parameter '" + t.param.name + "'");
    check_device_pointer(t.param.grad, "gradient of '" + t.param.name + "'");
    DTensor d = describe(t);
    const int index = static_cast<int>(i);
    for (std::int64_t b = 0; b < t.numel; b += kChunk) chunks.push_back({index, b, std::min(b + kChunk, t.numel)});
    // Reduction view: AdamP's channel rows, Adafactor's (rows, cols) rows or the whole tensor.
    std::int64_t view_rows = 0;
    std::int64_t scratch = 0;
    if (adamp && t.param.shape.size() >= 2 && t.numel > 0) {
      view_rows = t.param.shape[0];
      scratch = math::AdamPScratch{view_rows}.doubles(std::max<std::int64_t>(view_rows, 1));
    } else if (adafactor && t.numel > 0) {
      view_rows = t.factored ? t.rows : 1;
      const std::int64_t batches = t.rows / t.batch_rows;
      // The two totals (sum p^2, sum u^2) after the factored statistics.
      scratch = (t.factored ? math::AdafactorScratch{t.rows, t.cols, batches}.doubles() : 0) + 2;
      if (t.factored) {
        d.colpart0 = col_partials;
        d.col_row_blocks = (t.batch_rows + kColumnRows - 1) / kColumnRows;
        int row_block = 0;
        for (std::int64_t b = 0; b < batches; ++b)
          for (std::int64_t k = 0; k < d.col_row_blocks; ++k, ++row_block) {
            const std::int64_t r0 = b * t.batch_rows + k * kColumnRows;
            const std::int64_t r1 = std::min(r0 + kColumnRows, (b + 1) * t.batch_rows);
            for (std::int64_t c = 0; c < t.cols; c += 256) col_items.push_back({index, row_block, r0, r1, c});
          }
        col_partials += static_cast<std::int64_t>(row_block) * t.cols;
      }
    }
    if (view_rows > 0) {
      const std::int64_t len = t.numel / view_rows;
      d.view_rows = view_rows;
      d.seg0 = static_cast<std::int64_t>(segments.size());
      d.segs_per_row = (len + kSegment - 1) / kSegment;
      for (std::int64_t r = 0; r < view_rows; ++r)
        for (std::int64_t s = 0; s < d.segs_per_row; ++s)
          segments.push_back({index, r * len + s * kSegment, std::min(r * len + (s + 1) * kSegment, (r + 1) * len)});
    }
    scratch_offsets.push_back(scratch_doubles);
    scratch_doubles += scratch;
    for (int j = 0; j < t.slot_count; ++j)
      if (t.slots[j].rank1) rank1.push_back(make_int2(index, j));
    ds.tensors.push_back(d);
  }
  create_muon(impl, ds);
  auto* scratch = zeroed<double>(ds, static_cast<std::size_t>(scratch_doubles), "reduction scratch");
  for (std::size_t i = 0; i < ds.tensors.size(); ++i)
    if (scratch_offsets[i] < scratch_doubles && (i + 1 == ds.tensors.size() || scratch_offsets[i + 1] > scratch_offsets[i]))
      ds.tensors[i].scratch = scratch + scratch_offsets[i];

  std::vector<math::Codebook> books(math::kCodebookCount);
  for (int i = 0; i < math::kCodebookCount; ++i) books[i] = codebook(static_cast<math::CodebookId>(i));

  Tables& tb = ds.tb;
  tb.tensors = upload_vector(ds, ds.tensors, "tensor table");
  tb.tensor_count = static_cast<int>(ds.tensors.size());
  tb.chunks = upload_vector(ds, chunks, "chunk table");
  tb.chunk_count = static_cast<long long>(chunks.size());
  tb.constants = zeroed<math::StepConstants>(ds, ds.tensors.size(), "step constants");
  tb.tensor_steps = zeroed<long long>(ds, ds.tensors.size(), "step counts");
  tb.tensor_running = zeroed<double>(ds, 2 * ds.tensors.size(), "running sums");
  const std::vector<DScalars> initial{{1.0f, 1.0f, 0, 0, std::nan(""), 0, 0, 1.0f}};
  tb.scalars = upload_vector(ds, initial, "step scalars");
  tb.codebooks = upload_vector(ds, books, "codebooks");
  tb.partials = zeroed<double>(ds, std::max<std::size_t>(chunks.size(), 1), "norm partials");
  tb.segments = upload_vector(ds, segments, "segment table");
  tb.segment_count = static_cast<long long>(segments.size());
  tb.segment_sums = zeroed<double>(ds, 3 * segments.size(), "segment sums");
  tb.col_items = upload_vector(ds, col_items, "column table");
  tb.col_item_count = static_cast<long long>(col_items.size());
  tb.col_partials = zeroed<double>(ds, static_cast<std::size_t>(col_partials), "column sums");
  tb.bad_flag = zeroed<int>(ds, 1, "check flag");
  ds.rank1_slots = upload_vector(ds, rank1, "rank-1 slots");
  ds.rank1_count = static_cast<int>(rank1.size());
  ds.hessian_ptrs = zeroed<const float*>(ds, ds.tensors.size(), "Hessian estimates");

  StepConfig& cfg = ds.cfg;
  cfg.algorithm = algorithm;
  cfg.hyper = impl.hyper;
  cfg.max_grad_norm = impl.options.max_grad_norm;
  cfg.check_finite = impl.options.check_finite ? 1 : 0;
  cfg.stochastic_state = impl.options.stochastic_rounding ? 1 : 0;
  cfg.stochastic_param = impl.options.param_stochastic_rounding ? 1 : 0;
  cfg.seed = impl.options.seed;
  ds.norm = impl.options.check_finite || impl.options.max_grad_norm > 0.0f;

  // Pinned buffers for the table uploads of set_grads, made now: allocating inside a capture fails.
  const std::size_t table_bytes = std::max<std::size_t>(ds.tensors.size(), 1) * sizeof(DTensor);
  NIBBLE_CUDA_CHECK(cudaMallocHost(&ds.staging, table_bytes));
  NIBBLE_CUDA_CHECK(cudaMallocHost(&ds.capture_staging, table_bytes));
  NIBBLE_CUDA_CHECK(cudaEventCreateWithFlags(&ds.staging_done, cudaEventDisableTiming));
  NIBBLE_CUDA_CHECK(cudaEventRecord(ds.staging_done, ds.stream));

  launch_master_init(tb, ds.stream);
  // Every upload above reads host vectors local to this function: they must land first.
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(ds.stream));
}

void set_scalars(Optimizer::Impl& impl, float grad_scale, float lr_scale, bool found_inf) {
  DeviceState& ds = state(impl);
  launch_set_scalars(ds.tb, grad_scale, lr_scale, found_inf ? 1 : 0, ds.stream);
}

void set_grads(Optimizer::Impl& impl) {
  DeviceState& ds = state(impl);
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    const TensorState& t = impl.tensors[i];
    if (ds.tensors[i].grad != t.param.grad) check_device_pointer(t.param.grad, "gradient of '" + t.param.name + "'");
    ds.tensors[i].grad = t.param.grad;
  }
  upload_tensor_table(ds);
}

void set_stream(Optimizer::Impl& impl, void* stream) { state(impl).stream = static_cast<cudaStream_t>(stream); }

void enqueue_grad_square_sum(Optimizer::Impl& impl, std::span<const std::uint8_t> counted, double* out) {
  DeviceState& ds = state(impl);
  check_device_pointer(out, "the gradient square sum's output");
  const std::uint8_t* flags = nullptr;
  if (!counted.empty()) {
    if (!std::equal(counted.begin(), counted.end(), ds.counted_host.begin(), ds.counted_host.end())) {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      NIBBLE_CUDA_CHECK(cudaStreamIsCapturing(ds.stream, &capture));
      if (capture == cudaStreamCaptureStatusActive)
        throw InvalidArgument("enqueue_grad_square_sum: new counted flags inside a CUDA graph capture; pass the same "
                              "flags once before capturing");
      if (ds.counted == nullptr) ds.counted = static_cast<std::uint8_t*>(device_alloc(ds, counted.size(), "counted flags"));
      ds.counted_host.assign(counted.begin(), counted.end());
      NIBBLE_CUDA_CHECK(cudaMemcpyAsync(ds.counted, ds.counted_host.data(), counted.size(), cudaMemcpyHostToDevice,
                                        ds.stream));
    }
    flags = ds.counted;
  }
  launch_grad_square_sum(ds.tb, flags, out, ds.stream);
}

// `external_total`: null, or the device double whose value is this step's gradient square sum.
void enqueue_step(Optimizer::Impl& impl, const double* external_total = nullptr) {
  DeviceState& ds = state(impl);
  const Algorithm algorithm = ds.cfg.algorithm;
  launch_begin_step(ds.tb, ds.cfg, ds.norm, external_total, ds.stream);
  if (algorithm == Algorithm::kAdamP) launch_adamp_prepare(ds.tb, ds.cfg, ds.stream);
  if (algorithm == Algorithm::kAdafactor) launch_adafactor_prepare(ds.tb, ds.cfg, ds.stream);
  if (ds.rank1_count > 0) {
    launch_rank1_reset(ds.tb, ds.rank1_slots, ds.rank1_count, ds.stream);
    launch_rank1_max(ds.tb, ds.cfg, ds.stream);
  }
  launch_update(ds.tb, ds.cfg, ds.stream);
  if (ds.rank1_count > 0) launch_rank1_commit(ds.tb, ds.rank1_slots, ds.rank1_count, ds.stream);
  // Muon: the update pass left each matrix's momentum update; orthogonalise and apply them.
  for (const NsBatch& batch : ds.ns_batches) {
    launch_muon_load(ds.tb, batch, ds.cfg.hyper.eps, ds.stream);
    __nv_bfloat16* result = newton_schulz_batched(ds.cublas, batch, ds.cfg.hyper, ds.stream);
    launch_muon_apply(ds.tb, ds.cfg, batch, result, ds.stream);
  }
}

StepResult read_result(Optimizer::Impl& impl) {
  DeviceState& ds = state(impl);
  DScalars sc{};
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(&sc, ds.tb.scalars, sizeof sc, cudaMemcpyDeviceToHost, ds.stream));
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(ds.stream));
  impl.steps = sc.steps;
  impl.skipped = sc.skipped;
  StepResult result;
  result.skipped = sc.skip != 0;
  result.grad_norm = sc.grad_norm;
  result.step = sc.steps;
  return result;
}

void pull_counters(Optimizer::Impl& impl, std::vector<TensorState>& into) {
  DeviceState& ds = state(impl);
  std::vector<long long> steps(ds.tensors.size());
  std::vector<double> running(2 * ds.tensors.size());
  DScalars sc{};
  copy_and_wait(ds, steps.data(), ds.tb.tensor_steps, steps.size() * sizeof(long long), cudaMemcpyDeviceToHost);
  copy_and_wait(ds, running.data(), ds.tb.tensor_running, running.size() * sizeof(double), cudaMemcpyDeviceToHost);
  copy_and_wait(ds, &sc, ds.tb.scalars, sizeof sc, cudaMemcpyDeviceToHost);
  for (std::size_t i = 0; i < into.size() && i < steps.size(); ++i) {
    into[i].step = steps[i];
    into[i].running = {running[2 * i], running[2 * i + 1]};
  }
  impl.steps = sc.steps;
  impl.skipped = sc.skipped;
}

void push_counters(Optimizer::Impl& impl) {
  DeviceState& ds = state(impl);
  std::vector<long long> steps;
  std::vector<double> running;
  for (const TensorState& t : impl.tensors) {
    steps.push_back(t.step);
    running.insert(running.end(), t.running.begin(), t.running.end());
  }
  copy_and_wait(ds, ds.tb.tensor_steps, steps.data(), steps.size() * sizeof(long long), cudaMemcpyHostToDevice);
  copy_and_wait(ds, ds.tb.tensor_running, running.data(), running.size() * sizeof(double), cudaMemcpyHostToDevice);
  DScalars sc{};
  copy_and_wait(ds, &sc, ds.tb.scalars, sizeof sc, cudaMemcpyDeviceToHost);
  sc.steps = impl.steps;
  sc.skipped = impl.skipped;
  copy_and_wait(ds, ds.tb.scalars, &sc, sizeof sc, cudaMemcpyHostToDevice);
}

// set_hyper: the step configuration, and every tensor's rates and Muon lr factor in the table.
void hyper_changed(Optimizer::Impl& impl) {
  DeviceState& ds = state(impl);
  ds.cfg.hyper = impl.hyper;
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    const TensorState& t = impl.tensors[i];
    DTensor& d = ds.tensors[i];
    d.lr = t.lr;
    d.weight_decay = t.weight_decay;
    if (d.muon_update != nullptr) d.muon_factor = muon_factor(impl.hyper, t);
  }
  upload_tensor_table(ds);
}

void set_grad(Optimizer::Impl& impl, std::size_t index) {
  DeviceState& ds = state(impl);
  const TensorState& t = impl.tensors[index];
  check_device_pointer(t.param.grad, "gradient of '" + t.param.name + "'");
  ds.tensors[index].grad = t.param.grad;
  upload_tensor_table(ds);
}

std::int64_t update_hessian(Optimizer::Impl& impl, std::span<const float* const> estimates) {
  DeviceState& ds = state(impl);
  for (std::size_t i = 0; i < estimates.size(); ++i)
    check_device_pointer(estimates[i], "Hessian estimate of '" + impl.tensors[i].param.name + "'");
  const int none = INT_MAX;
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(ds.hessian_ptrs, estimates.data(), estimates.size() * sizeof(float*),
                                    cudaMemcpyHostToDevice, ds.stream));
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(ds.tb.bad_flag, &none, sizeof none, cudaMemcpyHostToDevice, ds.stream));
  launch_hessian_check(ds.tb, ds.hessian_ptrs, ds.stream);
  int bad = none;
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(&bad, ds.tb.bad_flag, sizeof bad, cudaMemcpyDeviceToHost, ds.stream));
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(ds.stream));
  if (bad != none) return bad;
  launch_hessian(ds.tb, ds.cfg, ds.hessian_ptrs, ds.stream);
  return -1;
}

void download(const Optimizer::Impl& impl, std::byte* host) {
  DeviceState& ds = state(impl);
  copy_and_wait(ds, host, ds.arena, static_cast<std::size_t>(ds.arena_bytes), cudaMemcpyDeviceToHost);
}

void upload(Optimizer::Impl& impl, const std::byte* host) {
  DeviceState& ds = state(impl);
  copy_and_wait(ds, ds.arena, host, static_cast<std::size_t>(ds.arena_bytes), cudaMemcpyHostToDevice);
}

DeviceScalars scalars(const Optimizer::Impl& impl) {
  DScalars* s = state(impl).tb.scalars;
  DeviceScalars out;
  out.lr_scale = &s->lr_scale;
  out.grad_scale = &s->grad_scale;
  out.found_inf = &s->found_inf;
  out.skipped_last = &s->skip;
  out.grad_norm = &s->grad_norm;
  out.steps = reinterpret_cast<std::int64_t*>(&s->steps);
  out.skipped = reinterpret_cast<std::int64_t*>(&s->skipped);
  return out;
}

void synchronize(const Optimizer::Impl& impl) { NIBBLE_CUDA_CHECK(cudaStreamSynchronize(state(impl).stream)); }

class CudaBackend final : public Backend {
 public:
  std::unique_ptr<DeviceState> ds;

  std::byte* allocate_arena(Optimizer::Impl& impl, std::int64_t bytes) override {
    ds = std::make_unique<DeviceState>();
    return cuda::allocate_arena(impl, *ds, bytes);
  }
  void create(Optimizer::Impl& impl) override { cuda::create(impl); }

  StepResult step(Optimizer::Impl& impl, const StepOptions& options) override {
    if (options.grad_square_sum)
      throw InvalidArgument("a step with a gradient square sum from all ranks runs on the CPU backend only "
                            "(this optimizer is on CUDA)");
    set_scalars(impl, options.grad_scale, options.lr_scale, options.found_inf);
    cuda::enqueue_step(impl);
    if (!options.synchronize) {
      StepResult queued;
      queued.grad_norm = std::numeric_limits<double>::quiet_NaN();
      queued.step = -1;
      return queued;
    }
    return read_result(impl);
  }
  double grad_square_sum(Optimizer::Impl&, std::span<const std::uint8_t>) override {
    throw InvalidArgument("grad_square_sum() runs on the CPU backend only (this optimizer is on CUDA)");
  }
  void enqueue_step(Optimizer::Impl& impl) override { cuda::enqueue_step(impl); }
  void enqueue_grad_square_sum(Optimizer::Impl& impl, std::span<const std::uint8_t> counted, double* out) override {
    cuda::enqueue_grad_square_sum(impl, counted, out);
  }
  void enqueue_step_with_square_sum(Optimizer::Impl& impl, const double* square_sum) override {
    check_device_pointer(square_sum, "the gradient square sum");
    cuda::enqueue_step(impl, square_sum);
  }
  DeviceScalars scalars(const Optimizer::Impl& impl) const override { return cuda::scalars(impl); }
  void synchronize(const Optimizer::Impl& impl) const override { cuda::synchronize(impl); }
  void set_stream(Optimizer::Impl& impl, void* stream) override { cuda::set_stream(impl, stream); }
  void grad_changed(Optimizer::Impl& impl, std::size_t index) override { set_grad(impl, index); }
  void grads_changed(Optimizer::Impl& impl) override { set_grads(impl); }
  void update_hessian(Optimizer::Impl& impl, std::span<const float* const> estimates) override {
    if (const std::int64_t bad = cuda::update_hessian(impl, estimates); bad >= 0)
      throw InvalidArgument("Hessian estimate of '" + impl.tensors[bad].param.name + "' holds inf or NaN");
  }
  void hyper_changed(Optimizer::Impl& impl) override { cuda::hyper_changed(impl); }
  void refresh_counters(Optimizer::Impl& impl) override { pull_counters(impl, impl.tensors); }

  HostState host_state(Optimizer::Impl& impl) override {
    HostState state;
    state.bytes = Buffer(static_cast<std::size_t>(impl.arena_bytes));
    download(impl, state.bytes.data());
    state.copy = impl.tensors;
    const std::byte* from = ds->arena;
    std::byte* to = state.bytes.data();
    for (TensorState& t : state.copy)
      for_each_region(t, [&](const Region&, auto*& p) {
        if (p != nullptr)
          p = reinterpret_cast<std::remove_reference_t<decltype(p)>>(to + (reinterpret_cast<const std::byte*>(p) - from));
      });
    pull_counters(impl, state.copy);
    state.tensors = &state.copy;
    return state;
  }
  void commit_host_state(Optimizer::Impl& impl, HostState& state) override {
    upload(impl, state.bytes.data());
    for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
      impl.tensors[i].step = state.copy[i].step;
      impl.tensors[i].running = state.copy[i].running;
    }
    push_counters(impl);
  }
  void interpolate_params(Optimizer::Impl& impl, float weight) override {
    launch_interpolate_params(ds->tb, weight, ds->stream);
    cuda::synchronize(impl);
  }
};

DeviceState& state(const Optimizer::Impl& impl) { return *static_cast<const CudaBackend&>(*impl.backend).ds; }

}  // namespace
}  // namespace nibble::cuda

namespace nibble {

std::unique_ptr<Backend> make_cuda_backend() {
  if (cuda_device_count() == 0)
    throw DeviceError("a CUDA optimizer was asked for, but no CUDA device is visible (no GPU or no driver)");
  return std::make_unique<cuda::CudaBackend>();
}

}  // namespace nibble
