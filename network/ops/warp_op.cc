// Trilinear warp of channel-last 3-D volumes as a TensorFlow CPU custom op.
//
// LdrWarp(image, flow) -> output
//   image  [B, X, Y, Z, C] float32 (any C)
//   flow   [B, X, Y, Z, 3] float32, displacement in voxels; channel k moves along axis k+1
//   output [B, X, Y, Z, C] float32, output(p) = image(p + flow(p)), trilinear.
//   attr padding: "border" clamps the sample position into [0, n-1] per axis (scipy
//   map_coordinates mode='nearest'; the derivative w.r.t. the position is 0 along an axis
//   where the position lies strictly outside); "zeros" lets corners outside the volume
//   contribute 0.
// LdrWarpGradImage(image, flow, grad) -> d loss / d image   [B, X, Y, Z, C]
// LdrWarpGradFlow(image, flow, grad)  -> d loss / d flow    [B, X, Y, Z, 3]
//   grad is d loss / d output. The image gradient is a scatter-add; it is race-free and
//   deterministic for a given thread count (see WarpGradImageOp).
//
// The arithmetic follows network/spatial_transformer.py's warp_tf term by term (same
// positions, floor, weights and summation order), so results agree to float rounding.
// Work is spread over TensorFlow's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;
using ThreadPool = tsl::thread::ThreadPool;

enum class Padding { kBorder, kZeros };

// Sizes of a batch of volumes: batch, the three spatial axes, channels.
struct Grid {
  int64_t batch, nx, ny, nz, channels;
  int64_t voxels() const { return nx * ny * nz; }  // voxels of one batch item
};

// One axis of a sample position: the lower and upper grid index (clamped into the
// volume), their interpolation weights, and the derivatives of those weights with
// respect to the position (voxel units).
struct AxisCorners {
  int64_t index[2];
  float weight[2];
  float dweight[2];
};

// The two neighbours of position `pos` on an axis of `size` voxels.
inline AxisCorners SetupAxis(float pos, int64_t size, Padding padding) {
  AxisCorners a;
  const float last = static_cast<float>(size - 1);
  if (padding == Padding::kBorder) {
    // Clamp like tf.clip_by_value: its gradient passes for 0 <= pos <= last inclusive.
    const float slope = (pos >= 0.f && pos <= last) ? 1.f : 0.f;
    const float p = std::min(last, std::max(0.f, pos));  // std::max(0, NaN) is 0
    const float lo = std::floor(p);
    const float t = p - lo;
    const int64_t i0 = static_cast<int64_t>(lo);
    a.index[0] = i0;
    a.index[1] = std::min(i0 + 1, size - 1);
    a.weight[0] = 1.f - t;
    a.weight[1] = t;
    a.dweight[0] = -slope;
    a.dweight[1] = slope;
  } else {
    // Beyond [-2, last + 2] both corners are outside either way; clamping there only
    // keeps the integer conversion defined.
    const float p = std::min(last + 2.f, std::max(-2.f, pos));
    const float lo = std::floor(p);
    const float t = p - lo;
    const int64_t i0 = static_cast<int64_t>(lo);
    const int64_t i1 = i0 + 1;
    const bool in0 = i0 >= 0 && i0 <= size - 1;
    const bool in1 = i1 >= 0 && i1 <= size - 1;
    a.index[0] = std::min(std::max<int64_t>(i0, 0), size - 1);
    a.index[1] = std::min(std::max<int64_t>(i1, 0), size - 1);
    a.weight[0] = in0 ? 1.f - t : 0.f;
    a.weight[1] = in1 ? t : 0.f;
    a.dweight[0] = in0 ? -1.f : 0.f;
    a.dweight[1] = in1 ? 1.f : 0.f;
  }
  return a;
}

// The 8 corners of one voxel's sample position, ordered x-major (corner k = 4i + 2j + l
// for lower/upper i, j, l along x, y, z): element offsets into one batch item of the
// image (already multiplied by the channel count) and trilinear weights.
struct VoxelCorners {
  AxisCorners axis[3];
  int64_t offset[8];
  float weight[8];
};

// Corners of voxel (x, y, z) displaced by `flow` (3 floats, voxels).
inline void SetupVoxel(const Grid& g, Padding padding, const float* flow, int64_t x,
                       int64_t y, int64_t z, VoxelCorners* v) {
  v->axis[0] = SetupAxis(static_cast<float>(x) + flow[0], g.nx, padding);
  v->axis[1] = SetupAxis(static_cast<float>(y) + flow[1], g.ny, padding);
  v->axis[2] = SetupAxis(static_cast<float>(z) + flow[2], g.nz, padding);
  const AxisCorners& ax = v->axis[0];
  const AxisCorners& ay = v->axis[1];
  const AxisCorners& az = v->axis[2];
  int k = 0;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const int64_t row = (ax.index[i] * g.ny + ay.index[j]) * g.nz;
      const float wxy = ax.weight[i] * ay.weight[j];
      for (int l = 0; l < 2; ++l, ++k) {
        v->offset[k] = (row + az.index[l]) * g.channels;
        v->weight[k] = wxy * az.weight[l];
      }
    }
  }
}

// Calls fn(v, b, x, y, z) for the flat voxel indices v in [begin, end) of the whole
// batch (v = ((b * nx + x) * ny + y) * nz + z), stepping the coordinates incrementally.
template <typename Fn>
inline void ForVoxels(const Grid& g, int64_t begin, int64_t end, Fn fn) {
  int64_t rest = begin;
  int64_t z = rest % g.nz;
  rest /= g.nz;
  int64_t y = rest % g.ny;
  rest /= g.ny;
  int64_t x = rest % g.nx;
  int64_t b = rest / g.nx;
  for (int64_t v = begin; v < end; ++v) {
    fn(v, b, x, y, z);
    if (++z == g.nz) {
      z = 0;
      if (++y == g.ny) {
        y = 0;
        if (++x == g.nx) {
          x = 0;
          ++b;
        }
      }
    }
  }
}

// Runs body(std::integral_constant<int64_t, C>) with C = the channel count when it is 1
// or 3 (so inner channel loops unroll), otherwise with C = 0 meaning "read g.channels".
template <typename Body>
inline void DispatchChannels(int64_t channels, Body body) {
  if (channels == 1) {
    body(std::integral_constant<int64_t, 1>());
  } else if (channels == 3) {
    body(std::integral_constant<int64_t, 3>());
  } else {
    body(std::integral_constant<int64_t, 0>());
  }
}

// Checks image [B,X,Y,Z,C] and flow [B,X,Y,Z,3] and returns their sizes in *g.
absl::Status CheckInputs(const Tensor& image, const Tensor& flow, Grid* g) {
  if (image.dims() != 5) {
    return tensorflow::errors::InvalidArgument("image must be [B, X, Y, Z, C], got ",
                                               image.shape().DebugString());
  }
  if (flow.dims() != 5 || flow.dim_size(4) != 3) {
    return tensorflow::errors::InvalidArgument("flow must be [B, X, Y, Z, 3], got ",
                                               flow.shape().DebugString());
  }
  for (int d = 0; d < 4; ++d) {
    if (image.dim_size(d) != flow.dim_size(d)) {
      return tensorflow::errors::InvalidArgument(
          "image ", image.shape().DebugString(), " and flow ", flow.shape().DebugString(),
          " differ in batch or spatial size");
    }
  }
  *g = Grid{image.dim_size(0), image.dim_size(1), image.dim_size(2), image.dim_size(3),
            image.dim_size(4)};
  return absl::OkStatus();
}

ThreadPool* Workers(OpKernelContext* context) {
  return context->device()->tensorflow_cpu_worker_threads()->workers;
}

// Rough cycles per voxel for the thread pool's shard sizing.
int64_t CostPerVoxel(int64_t channels) { return 120 + 40 * channels; }

// The three kernels share the "padding" attr.
class WarpKernelBase : public OpKernel {
 public:
  explicit WarpKernelBase(OpKernelConstruction* context) : OpKernel(context) {
    std::string padding;
    OP_REQUIRES_OK(context, context->GetAttr("padding", &padding));
    padding_ = padding == "zeros" ? Padding::kZeros : Padding::kBorder;
  }

 protected:
  Padding padding_ = Padding::kBorder;
};

class WarpOp : public WarpKernelBase {
 public:
  explicit WarpOp(OpKernelConstruction* context) : WarpKernelBase(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& image = context->input(0);
    const Tensor& flow = context->input(1);
    Grid g;
    OP_REQUIRES_OK(context, CheckInputs(image, flow, &g));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, image.shape(), &output));
    if (g.batch * g.voxels() == 0) return;
    const float* image_data = image.flat<float>().data();
    const float* flow_data = flow.flat<float>().data();
    float* out_data = output->flat<float>().data();
    const Padding padding = padding_;
    const int64_t item = g.voxels() * g.channels;

    DispatchChannels(g.channels, [&](auto fixed) {
      constexpr int64_t kFixed = decltype(fixed)::value;
      const int64_t channels = kFixed > 0 ? kFixed : g.channels;
      auto shard = [&](int64_t begin, int64_t end) {
        VoxelCorners c;
        ForVoxels(g, begin, end, [&](int64_t v, int64_t b, int64_t x, int64_t y, int64_t z) {
          SetupVoxel(g, padding, flow_data + 3 * v, x, y, z, &c);
          const float* src = image_data + b * item;
          float* dst = out_data + v * channels;
          for (int64_t ch = 0; ch < channels; ++ch) {
            float sum = 0.f;
            for (int k = 0; k < 8; ++k) sum += src[c.offset[k] + ch] * c.weight[k];
            dst[ch] = sum;
          }
        });
      };
      Workers(context)->ParallelFor(g.batch * g.voxels(),
                                    ThreadPool::SchedulingParams::Adaptive(CostPerVoxel(channels)),
                                    shard);
    });
  }
};

class WarpGradFlowOp : public WarpKernelBase {
 public:
  explicit WarpGradFlowOp(OpKernelConstruction* context) : WarpKernelBase(context) {}

  // d loss / d flow(p)[a] = sum_c grad(p)[c] * sum_k dweight_a(k) * image(corner k)[c],
  // where dweight_a(k) is corner k's weight with axis a's factor replaced by its derivative.
  void Compute(OpKernelContext* context) override {
    const Tensor& image = context->input(0);
    const Tensor& flow = context->input(1);
    const Tensor& grad = context->input(2);
    Grid g;
    OP_REQUIRES_OK(context, CheckInputs(image, flow, &g));
    OP_REQUIRES(context, grad.shape() == image.shape(),
                tensorflow::errors::InvalidArgument("grad must have the image's shape"));
    Tensor* grad_flow = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, flow.shape(), &grad_flow));
    if (g.batch * g.voxels() == 0) return;
    const float* image_data = image.flat<float>().data();
    const float* flow_data = flow.flat<float>().data();
    const float* grad_data = grad.flat<float>().data();
    float* out_data = grad_flow->flat<float>().data();
    const Padding padding = padding_;
    const int64_t item = g.voxels() * g.channels;

    DispatchChannels(g.channels, [&](auto fixed) {
      constexpr int64_t kFixed = decltype(fixed)::value;
      const int64_t channels = kFixed > 0 ? kFixed : g.channels;
      auto shard = [&](int64_t begin, int64_t end) {
        VoxelCorners c;
        ForVoxels(g, begin, end, [&](int64_t v, int64_t b, int64_t x, int64_t y, int64_t z) {
          SetupVoxel(g, padding, flow_data + 3 * v, x, y, z, &c);
          const float* src = image_data + b * item;
          const float* dy = grad_data + v * channels;
          // value[k]: the incoming gradient dotted with corner k's channels.
          float value[8];
          for (int k = 0; k < 8; ++k) {
            float dot = 0.f;
            for (int64_t ch = 0; ch < channels; ++ch) dot += dy[ch] * src[c.offset[k] + ch];
            value[k] = dot;
          }
          const AxisCorners& ax = c.axis[0];
          const AxisCorners& ay = c.axis[1];
          const AxisCorners& az = c.axis[2];
          float gx = 0.f, gy = 0.f, gz = 0.f;
          int k = 0;
          for (int i = 0; i < 2; ++i) {
            for (int j = 0; j < 2; ++j) {
              for (int l = 0; l < 2; ++l, ++k) {
                gx += ax.dweight[i] * ay.weight[j] * az.weight[l] * value[k];
                gy += ax.weight[i] * ay.dweight[j] * az.weight[l] * value[k];
                gz += ax.weight[i] * ay.weight[j] * az.dweight[l] * value[k];
              }
            }
          }
          float* dst = out_data + 3 * v;
          dst[0] = gx;
          dst[1] = gy;
          dst[2] = gz;
        });
      };
      Workers(context)->ParallelFor(
          g.batch * g.voxels(),
          ThreadPool::SchedulingParams::Adaptive(CostPerVoxel(channels) + 40 * channels), shard);
    });
  }
};

// Voxels below which a batch item's scatter is not split further (a split costs a
// zeroed scratch volume and a reduction pass).
constexpr int64_t kMinVoxelsPerSplit = 32768;

class WarpGradImageOp : public WarpKernelBase {
 public:
  explicit WarpGradImageOp(OpKernelConstruction* context) : WarpKernelBase(context) {}

  // d loss / d image: every output voxel adds weight(k) * grad(p) to its 8 corners.
  // Scatters into one batch item only touch that item, so batch items are independent
  // tasks. When there are fewer items than threads, each item's voxels are cut into
  // `splits` fixed ranges; range 0 accumulates into the output, range s > 0 into its own
  // scratch volume, and the scratch volumes are then added to the output in order s =
  // 1, 2, ... . No two tasks write the same memory and the summation order depends only
  // on the thread count, so results are deterministic for a given thread count.
  void Compute(OpKernelContext* context) override {
    const Tensor& image = context->input(0);
    const Tensor& flow = context->input(1);
    const Tensor& grad = context->input(2);
    Grid g;
    OP_REQUIRES_OK(context, CheckInputs(image, flow, &g));
    OP_REQUIRES(context, grad.shape() == image.shape(),
                tensorflow::errors::InvalidArgument("grad must have the image's shape"));
    Tensor* grad_image = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, image.shape(), &grad_image));
    const int64_t voxels = g.voxels();
    const int64_t item = voxels * g.channels;
    if (g.batch * item == 0) return;

    const int threads = std::max(1, context->device()->tensorflow_cpu_worker_threads()->num_threads);
    const int64_t splits = std::max<int64_t>(
        1, std::min<int64_t>((threads + g.batch - 1) / g.batch, voxels / kMinVoxelsPerSplit));
    Tensor scratch;
    if (splits > 1) {
      OP_REQUIRES_OK(context, context->allocate_temp(
                                  tensorflow::DT_FLOAT,
                                  TensorShape({g.batch * (splits - 1) * item}), &scratch));
    }
    float* out_data = grad_image->flat<float>().data();
    float* scratch_data = splits > 1 ? scratch.flat<float>().data() : nullptr;
    // Accumulator of split s of batch item b: [X, Y, Z, C] floats.
    auto target = [&](int64_t b, int64_t s) {
      return s == 0 ? out_data + b * item : scratch_data + (b * (splits - 1) + s - 1) * item;
    };
    const float* flow_data = flow.flat<float>().data();
    const float* grad_data = grad.flat<float>().data();
    const Padding padding = padding_;

    DispatchChannels(g.channels, [&](auto fixed) {
      constexpr int64_t kFixed = decltype(fixed)::value;
      const int64_t channels = kFixed > 0 ? kFixed : g.channels;
      auto tasks = [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task) {
          const int64_t b = task / splits;
          const int64_t s = task % splits;
          float* dst = target(b, s);
          std::fill(dst, dst + item, 0.f);
          const int64_t begin = b * voxels + s * voxels / splits;
          const int64_t end = b * voxels + (s + 1) * voxels / splits;
          VoxelCorners c;
          ForVoxels(g, begin, end, [&](int64_t v, int64_t, int64_t x, int64_t y, int64_t z) {
            SetupVoxel(g, padding, flow_data + 3 * v, x, y, z, &c);
            const float* dy = grad_data + v * channels;
            for (int k = 0; k < 8; ++k) {
              float* corner = dst + c.offset[k];
              for (int64_t ch = 0; ch < channels; ++ch) corner[ch] += dy[ch] * c.weight[k];
            }
          });
        }
      };
      Workers(context)->ParallelFor(g.batch * splits, ThreadPool::SchedulingParams::Fixed(1),
                                    tasks);
    });

    if (splits > 1) {
      auto reduce = [&](int64_t begin, int64_t end) {
        for (int64_t b = 0; b < g.batch; ++b) {
          float* dst = target(b, 0);
          for (int64_t s = 1; s < splits; ++s) {
            const float* src = target(b, s);
            for (int64_t i = begin; i < end; ++i) dst[i] += src[i];
          }
        }
      };
      Workers(context)->ParallelFor(
          item, ThreadPool::SchedulingParams::Adaptive(2 * g.batch * splits), reduce);
    }
  }
};

// Shapes: image [B,X,Y,Z,C] and flow [B,X,Y,Z,3] with matching B, X, Y, Z.
absl::Status ImageFlowShapes(InferenceContext* c, ShapeHandle* image, ShapeHandle* flow) {
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 5, image));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 5, flow));
  DimensionHandle three;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(*flow, 4), 3, &three));
  ShapeHandle image_grid, flow_grid, grid;
  TF_RETURN_IF_ERROR(c->Subshape(*image, 0, 4, &image_grid));
  TF_RETURN_IF_ERROR(c->Subshape(*flow, 0, 4, &flow_grid));
  TF_RETURN_IF_ERROR(c->Merge(image_grid, flow_grid, &grid));
  TF_RETURN_IF_ERROR(c->Concatenate(grid, c->Vector(c->Dim(*image, 4)), image));
  return c->Concatenate(grid, c->Vector(three), flow);
}

}  // namespace

REGISTER_OP("LdrWarp")
    .Input("image: float")
    .Input("flow: float")
    .Output("output: float")
    .Attr("padding: {'border', 'zeros'} = 'border'")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle image, flow;
      TF_RETURN_IF_ERROR(ImageFlowShapes(c, &image, &flow));
      c->set_output(0, image);
      return tensorflow::OkStatus();
    })
    .Doc("output(p) = image(p + flow(p)), trilinear; image [B,X,Y,Z,C], flow [B,X,Y,Z,3] voxels.");

REGISTER_OP("LdrWarpGradImage")
    .Input("image: float")
    .Input("flow: float")
    .Input("grad: float")
    .Output("grad_image: float")
    .Attr("padding: {'border', 'zeros'} = 'border'")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle image, flow, merged;
      TF_RETURN_IF_ERROR(ImageFlowShapes(c, &image, &flow));
      TF_RETURN_IF_ERROR(c->Merge(image, c->input(2), &merged));
      c->set_output(0, merged);
      return tensorflow::OkStatus();
    })
    .Doc("Gradient of LdrWarp w.r.t. image, given grad = d loss / d output.");

REGISTER_OP("LdrWarpGradFlow")
    .Input("image: float")
    .Input("flow: float")
    .Input("grad: float")
    .Output("grad_flow: float")
    .Attr("padding: {'border', 'zeros'} = 'border'")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle image, flow, merged;
      TF_RETURN_IF_ERROR(ImageFlowShapes(c, &image, &flow));
      TF_RETURN_IF_ERROR(c->Merge(image, c->input(2), &merged));
      c->set_output(0, flow);
      return tensorflow::OkStatus();
    })
    .Doc("Gradient of LdrWarp w.r.t. flow, given grad = d loss / d output.");

REGISTER_KERNEL_BUILDER(Name("LdrWarp").Device(DEVICE_CPU), WarpOp);
REGISTER_KERNEL_BUILDER(Name("LdrWarpGradImage").Device(DEVICE_CPU), WarpGradImageOp);
REGISTER_KERNEL_BUILDER(Name("LdrWarpGradFlow").Device(DEVICE_CPU), WarpGradFlowOp);
