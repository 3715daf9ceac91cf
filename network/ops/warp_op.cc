// Trilinear warp of channel-last 3-D volumes as TensorFlow CPU custom ops.
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
//   deterministic for a given thread count.
//
// Positions, floors, weights and clamping follow network/spatial_transformer.py's warp_tf
// exactly, and results agree with it to float rounding; non-finite flows give finite
// outputs where warp_tf gives NaN.
//
// The kernels, free of TensorFlow, are in warp_geometry.h (layout, runs, neighbours and
// weights), warp_forward.h with warp_forward_avx2.h (interpolation) and warp_gradients.h.
// This file holds the TensorFlow side: shape functions, the input checks and "padding" attr
// shared by the three kernels, and the sharding of runs over the intra-op thread pool.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "warp_forward.h"
#include "warp_geometry.h"
#include "warp_gradients.h"

namespace {

using ldr_warp::Accumulators;
using ldr_warp::Grid;
using ldr_warp::kRun;
using ldr_warp::Padding;
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

// The kernels' inputs, by index.
constexpr int kImage = 0;
constexpr int kFlow = 1;
constexpr int kGrad = 2;  // the gradient kernels only

// Runs body(padding tag, channel tag) with compile-time constants: the padding, and the
// channel count when it is 1 or 3, else 0 (the kernels' kChannels, see ChannelCount).
template <typename Body>
void Dispatch(Padding padding, int64_t channels, Body body) {
  auto with_padding = [&](auto pad) {
    if (channels == 1) {
      body(pad, std::integral_constant<int64_t, 1>());
    } else if (channels == 3) {
      body(pad, std::integral_constant<int64_t, 3>());
    } else {
      body(pad, std::integral_constant<int64_t, 0>());
    }
  };
  if (padding == Padding::kBorder) {
    with_padding(std::integral_constant<Padding, Padding::kBorder>());
  } else {
    with_padding(std::integral_constant<Padding, Padding::kZeros>());
  }
}

// Checks image [B,X,Y,Z,C], flow [B,X,Y,Z,3] and, for the gradient kernels, grad (the
// image's shape), and returns their sizes in *g.
absl::Status CheckInputs(OpKernelContext* context, Grid* g) {
  const Tensor& image = context->input(kImage);
  const Tensor& flow = context->input(kFlow);
  if (image.dims() != 5) {
    return absl::InvalidArgumentError(
        absl::StrCat("image must be [B, X, Y, Z, C], got ", image.shape().DebugString()));
  }
  if (flow.dims() != 5 || flow.dim_size(4) != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("flow must be [B, X, Y, Z, 3], got ", flow.shape().DebugString()));
  }
  for (int d = 0; d < 4; ++d) {
    if (image.dim_size(d) != flow.dim_size(d)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "image ", image.shape().DebugString(), " and flow ", flow.shape().DebugString(),
          " differ in batch or spatial size"));
    }
  }
  if (image.NumElements() / std::max<int64_t>(1, image.dim_size(0)) >
      std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("one batch item of the image must hold < 2^31 values");
  }
  if (context->num_inputs() > kGrad && context->input(kGrad).shape() != image.shape()) {
    return absl::InvalidArgumentError("grad must have the image's shape");
  }
  *g = Grid{image.dim_size(0), image.dim_size(1), image.dim_size(2), image.dim_size(3),
            image.dim_size(4)};
  return absl::OkStatus();
}

// The intra-op thread pool.
ThreadPool* Workers(OpKernelContext* context) {
  return context->device()->tensorflow_cpu_worker_threads()->workers;
}

// Rough cycles per run for the thread pool's shard sizing.
int64_t CostPerRun(int64_t channels) { return kRun * (40 + 20 * channels); }

// Calls shard(first, last) on ranges of the batch's runs, over the intra-op thread pool;
// `cost`: rough cycles per run.
template <typename Shard>
void ShardRuns(OpKernelContext* context, const Grid& g, int64_t cost, Shard shard) {
  Workers(context)->ParallelFor(g.runs(), ThreadPool::SchedulingParams::Adaptive(cost), shard);
}

// What the three kernels share: the "padding" attr, the input checks and the output, of
// the shape of input `output_like`; a subclass's ComputeOutput fills it.
class WarpKernel : public OpKernel {
 public:
  WarpKernel(OpKernelConstruction* context, int output_like)
      : OpKernel(context), output_like_(output_like) {
    std::string padding;
    OP_REQUIRES_OK(context, context->GetAttr("padding", &padding));
    padding_ = padding == "zeros" ? Padding::kZeros : Padding::kBorder;
  }

  void Compute(OpKernelContext* context) final {
    Grid g;
    OP_REQUIRES_OK(context, CheckInputs(context, &g));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, context->input(output_like_).shape(), &output));
    if (output->NumElements() == 0) return;
    ComputeOutput(context, g, output->flat<float>().data());
  }

 protected:
  // Writes the output `out` from the checked inputs, of sizes g.
  virtual void ComputeOutput(OpKernelContext* context, const Grid& g, float* out) = 0;

  // The data of input `index` (kImage, kFlow or kGrad).
  static const float* Input(OpKernelContext* context, int index) {
    return context->input(index).flat<float>().data();
  }

  Padding padding_ = Padding::kBorder;

 private:
  int output_like_;
};

class WarpOp : public WarpKernel {
 public:
  explicit WarpOp(OpKernelConstruction* context) : WarpKernel(context, kImage) {}

 private:
  void ComputeOutput(OpKernelContext* context, const Grid& g, float* out) override {
    const float* image = Input(context, kImage);
    const float* flow = Input(context, kFlow);
    Dispatch(padding_, g.channels, [&](auto pad, auto fixed) {
      constexpr Padding kPadding = decltype(pad)::value;
      constexpr int64_t kChannels = decltype(fixed)::value;
      ShardRuns(context, g, CostPerRun(g.channels), [&](int64_t first, int64_t last) {
        ldr_warp::WarpRuns<kPadding, kChannels>(g, image, flow, out, first, last);
      });
    });
  }
};

class WarpGradFlowOp : public WarpKernel {
 public:
  explicit WarpGradFlowOp(OpKernelConstruction* context) : WarpKernel(context, kFlow) {}

 private:
  void ComputeOutput(OpKernelContext* context, const Grid& g, float* out) override {
    const float* image = Input(context, kImage);
    const float* flow = Input(context, kFlow);
    const float* grad = Input(context, kGrad);
    Dispatch(padding_, g.channels, [&](auto pad, auto fixed) {
      constexpr Padding kPadding = decltype(pad)::value;
      constexpr int64_t kChannels = decltype(fixed)::value;
      ShardRuns(context, g, 2 * CostPerRun(g.channels), [&](int64_t first, int64_t last) {
        ldr_warp::GradFlowRuns<kPadding, kChannels>(g, image, flow, grad, out, first, last);
      });
    });
  }
};

// One task per accumulator (see warp_gradients.h), then the reduction of the splits.
class WarpGradImageOp : public WarpKernel {
 public:
  explicit WarpGradImageOp(OpKernelConstruction* context) : WarpKernel(context, kImage) {}

 private:
  void ComputeOutput(OpKernelContext* context, const Grid& g, float* out) override {
    const int64_t threads =
        std::max(1, context->device()->tensorflow_cpu_worker_threads()->num_threads);
    Accumulators acc{out, nullptr, g.voxels() * g.channels, ldr_warp::ScatterSplits(g, threads)};
    Tensor scratch;
    if (acc.splits > 1) {
      OP_REQUIRES_OK(context, context->allocate_temp(
                                  tensorflow::DT_FLOAT,
                                  TensorShape({g.batch * (acc.splits - 1) * acc.item}), &scratch));
      acc.scratch = scratch.flat<float>().data();
    }
    const float* flow = Input(context, kFlow);
    const float* grad = Input(context, kGrad);
    Dispatch(padding_, g.channels, [&](auto pad, auto fixed) {
      constexpr Padding kPadding = decltype(pad)::value;
      constexpr int64_t kChannels = decltype(fixed)::value;
      auto tasks = [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task) {
          ldr_warp::ScatterTask<kPadding, kChannels>(g, flow, grad, acc, task);
        }
      };
      Workers(context)->ParallelFor(g.batch * acc.splits, ThreadPool::SchedulingParams::Fixed(1),
                                    tasks);
    });
    if (acc.splits > 1) {
      auto reduce = [&](int64_t begin, int64_t end) {
        ldr_warp::SumSplits(acc, g.batch, begin, end);
      };
      Workers(context)->ParallelFor(
          acc.item, ThreadPool::SchedulingParams::Adaptive(2 * g.batch * acc.splits), reduce);
    }
  }
};

// Shapes: image [B,X,Y,Z,C] and flow [B,X,Y,Z,3] with matching B, X, Y, Z.
absl::Status ImageFlowShapes(InferenceContext* c, ShapeHandle* image, ShapeHandle* flow) {
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kImage), 5, image));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(kFlow), 5, flow));
  DimensionHandle three;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(*flow, 4), 3, &three));
  ShapeHandle image_grid, flow_grid, grid;
  TF_RETURN_IF_ERROR(c->Subshape(*image, 0, 4, &image_grid));
  TF_RETURN_IF_ERROR(c->Subshape(*flow, 0, 4, &flow_grid));
  TF_RETURN_IF_ERROR(c->Merge(image_grid, flow_grid, &grid));
  TF_RETURN_IF_ERROR(c->Concatenate(grid, c->Vector(c->Dim(*image, 4)), image));
  return c->Concatenate(grid, c->Vector(three), flow);
}

// Shape function of the gradient ops: grad has the image's shape; the output the image's
// (of_flow false) or the flow's.
absl::Status GradShape(InferenceContext* c, bool of_flow) {
  ShapeHandle image, flow, merged;
  TF_RETURN_IF_ERROR(ImageFlowShapes(c, &image, &flow));
  TF_RETURN_IF_ERROR(c->Merge(image, c->input(kGrad), &merged));
  c->set_output(0, of_flow ? flow : merged);
  return absl::OkStatus();
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
      return absl::OkStatus();
    })
    .Doc("output(p) = image(p + flow(p)), trilinear; image [B,X,Y,Z,C], flow [B,X,Y,Z,3] voxels.");

REGISTER_OP("LdrWarpGradImage")
    .Input("image: float")
    .Input("flow: float")
    .Input("grad: float")
    .Output("grad_image: float")
    .Attr("padding: {'border', 'zeros'} = 'border'")
    .SetShapeFn([](InferenceContext* c) { return GradShape(c, false); })
    .Doc("Gradient of LdrWarp w.r.t. image, given grad = d loss / d output.");

REGISTER_OP("LdrWarpGradFlow")
    .Input("image: float")
    .Input("flow: float")
    .Input("grad: float")
    .Output("grad_flow: float")
    .Attr("padding: {'border', 'zeros'} = 'border'")
    .SetShapeFn([](InferenceContext* c) { return GradShape(c, true); })
    .Doc("Gradient of LdrWarp w.r.t. flow, given grad = d loss / d output.");

REGISTER_KERNEL_BUILDER(Name("LdrWarp").Device(DEVICE_CPU), WarpOp);
REGISTER_KERNEL_BUILDER(Name("LdrWarpGradImage").Device(DEVICE_CPU), WarpGradImageOp);
REGISTER_KERNEL_BUILDER(Name("LdrWarpGradFlow").Device(DEVICE_CPU), WarpGradFlowOp);
