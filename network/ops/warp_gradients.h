// Gradients of the trilinear warp (warp_forward.h) for runs of voxels, given grad = d loss /
// d output [B, X, Y, Z, C] (layout and clamping in warp_geometry.h). No TensorFlow
// dependency.
//
// d loss / d flow is computed per output voxel (GradFlowRuns). d loss / d image is a
// scatter-add: every output voxel p adds weight(k) * grad(p) to each of its 8 corners k.
// Scatters from one batch item only touch that item, so batch items are independent tasks.
// When there are fewer items than threads, each item's runs are cut into `splits` fixed
// ranges (ScatterSplits); range 0 accumulates into the output, range s > 0 into its own
// scratch volume, and the scratch volumes are then added to the output in the order
// s = 1, 2, ... (SumSplits). No two tasks write the same memory, and the summation order
// depends only on the thread count, so the image gradient is deterministic for a given
// thread count.

#ifndef NETWORK_OPS_WARP_GRADIENTS_H_
#define NETWORK_OPS_WARP_GRADIENTS_H_

#include <algorithm>
#include <cstdint>

#include "warp_geometry.h"

namespace ldr_warp {

// d loss / d flow at voxel i of a run, dst[0 .. 2]: along each axis a, the sum over corners
// k of value(k) times corner k's weight with axis a's factor replaced by its derivative,
// where value(k) = sum_c upstream[c] * image(k)[c]. `src` is the run's batch item of the
// image, `upstream` the grad at voxel i (`channels` floats), `axes` the run's neighbours
// with weight derivatives.
inline void FlowGradientAt(const float* src, const float* upstream, int64_t channels,
                           const AxisRun axes[3], int i, float* dst) {
  const AxisRun& ax = axes[0];
  const AxisRun& ay = axes[1];
  const AxisRun& az = axes[2];
  const Corners k = CornersAt(axes, i);
  // Per corner row (ix, iy): values interpolated along z (w) and their z slope (d).
  float zw[2][2], zd[2][2];
  for (int ix = 0; ix < 2; ++ix) {
    for (int iy = 0; iy < 2; ++iy) {
      float value[2];
      for (int iz = 0; iz < 2; ++iz) {
        const float* corner = src + k.row[ix][iy] + k.z[iz];
        float dot = 0.f;
        for (int64_t c = 0; c < channels; ++c) dot += upstream[c] * corner[c];
        value[iz] = dot;
      }
      zw[ix][iy] = value[0] * az.weight[0][i] + value[1] * az.weight[1][i];
      zd[ix][iy] = value[0] * az.dweight[0][i] + value[1] * az.dweight[1][i];
    }
  }
  // Then along y, then along x.
  float yw[2], yd[2], yzd[2];
  for (int ix = 0; ix < 2; ++ix) {
    yw[ix] = zw[ix][0] * ay.weight[0][i] + zw[ix][1] * ay.weight[1][i];
    yd[ix] = zw[ix][0] * ay.dweight[0][i] + zw[ix][1] * ay.dweight[1][i];
    yzd[ix] = zd[ix][0] * ay.weight[0][i] + zd[ix][1] * ay.weight[1][i];
  }
  dst[0] = yw[0] * ax.dweight[0][i] + yw[1] * ax.dweight[1][i];
  dst[1] = yd[0] * ax.weight[0][i] + yd[1] * ax.weight[1][i];
  dst[2] = yzd[0] * ax.weight[0][i] + yzd[1] * ax.weight[1][i];
}

// d loss / d flow for runs [first, last) of the batch into `out` [B, X, Y, Z, 3], from image
// and grad of ChannelCount<kChannels>(g) channels.
template <Padding P, int64_t kChannels>
void GradFlowRuns(const Grid& g, const float* image, const float* flow, const float* grad,
                  float* out, int64_t first, int64_t last) {
  const int64_t channels = ChannelCount<kChannels>(g);
  AxisRun axes[3];
  Run r = RunAt(g, first);
  for (int64_t index = first; index < last; ++index, r = NextRun(g, r)) {
    SetupRun<P, true>(g, channels, r, 0, flow, &axes[0], &axes[1], &axes[2]);
    const float* src = image + r.b * g.voxels() * channels;
    const float* upstream = grad + r.voxel * channels;
    float* dst = out + 3 * r.voxel;
    for (int i = 0; i < r.n; ++i, upstream += channels, dst += 3) {
      FlowGradientAt(src, upstream, channels, axes, i, dst);
    }
  }
}

// Adds voxel i's share of d loss / d image to its 8 corners in `dst`, the [X, Y, Z, C]
// accumulator of the run's batch item: weight(k) * upstream[c], with `upstream` the grad at
// voxel i (`channels` floats).
inline void ScatterAt(const float* upstream, int64_t channels, const AxisRun axes[3], int i,
                      float* dst) {
  const Corners k = CornersAt(axes, i);
  for (int ix = 0; ix < 2; ++ix) {
    for (int iy = 0; iy < 2; ++iy) {
      const float wxy = axes[0].weight[ix][i] * axes[1].weight[iy][i];
      for (int iz = 0; iz < 2; ++iz) {
        const float weight = wxy * axes[2].weight[iz][i];
        float* corner = dst + k.row[ix][iy] + k.z[iz];
        for (int64_t c = 0; c < channels; ++c) corner[c] += upstream[c] * weight;
      }
    }
  }
}

// Runs below which a batch item's scatter is not split further (a split costs a zeroed
// scratch volume and a reduction pass).
constexpr int64_t kMinRunsPerSplit = 512;

// The number of ranges each batch item's scatter is cut into on `threads` threads.
inline int64_t ScatterSplits(const Grid& g, int64_t threads) {
  return std::max<int64_t>(
      1, std::min((threads + g.batch - 1) / g.batch, g.runs_per_item() / kMinRunsPerSplit));
}

// The accumulators of the image gradient's tasks, [X, Y, Z, C] floats each: split 0 of
// batch item b in the output, split s > 0 in the scratch volumes.
struct Accumulators {
  float* out;      // [B, X, Y, Z, C], the image gradient
  float* scratch;  // [B, splits - 1, X, Y, Z, C]; unused when splits == 1
  int64_t item;    // floats per batch item, X * Y * Z * C
  int64_t splits;

  float* at(int64_t b, int64_t s) const {
    return s == 0 ? out + b * item : scratch + (b * (splits - 1) + s - 1) * item;
  }
};

// Task b * splits + s of the image gradient: zeroes accumulator (b, s) and scatter-adds into
// it the voxels of split s of batch item b's runs. `grad` has ChannelCount<kChannels>(g)
// channels.
template <Padding P, int64_t kChannels>
void ScatterTask(const Grid& g, const float* flow, const float* grad, const Accumulators& acc,
                 int64_t task) {
  const int64_t channels = ChannelCount<kChannels>(g);
  const int64_t b = task / acc.splits;
  const int64_t s = task % acc.splits;
  float* dst = acc.at(b, s);
  std::fill(dst, dst + acc.item, 0.f);
  const int64_t item_runs = g.runs_per_item();
  const int64_t begin = b * item_runs + s * item_runs / acc.splits;
  const int64_t end = b * item_runs + (s + 1) * item_runs / acc.splits;
  AxisRun axes[3];
  Run r = RunAt(g, begin);
  for (int64_t index = begin; index < end; ++index, r = NextRun(g, r)) {
    SetupRun<P, false>(g, channels, r, 0, flow, &axes[0], &axes[1], &axes[2]);
    const float* upstream = grad + r.voxel * channels;
    for (int i = 0; i < r.n; ++i, upstream += channels) ScatterAt(upstream, channels, axes, i, dst);
  }
}

// Adds, for each of `batch` items, the accumulators of splits 1, 2, ... in that order into
// split 0's (the output), over elements [begin, end) of an item.
inline void SumSplits(const Accumulators& acc, int64_t batch, int64_t begin, int64_t end) {
  for (int64_t b = 0; b < batch; ++b) {
    float* dst = acc.at(b, 0);
    for (int64_t s = 1; s < acc.splits; ++s) {
      const float* src = acc.at(b, s);
      for (int64_t i = begin; i < end; ++i) dst[i] += src[i];
    }
  }
}

}  // namespace ldr_warp

#endif  // NETWORK_OPS_WARP_GRADIENTS_H_
