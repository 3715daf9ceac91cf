// Forward trilinear warp: output(p) = image(p + flow(p)) for runs of voxels (layout and
// clamping in warp_geometry.h). No TensorFlow dependency.
//
// Per run, SetupRun computes each axis' neighbour offsets and weights, then the 8 corners
// are read and interpolated separably: along z in the 4 corner rows, then along y, then
// along x, so results agree with warp_tf to float rounding. Compiled with AVX2 and FMA,
// most voxels take the vector paths of warp_forward_avx2.h instead; the portable scalar
// code here serves the rest and builds without AVX2.

#ifndef NETWORK_OPS_WARP_FORWARD_H_
#define NETWORK_OPS_WARP_FORWARD_H_

#include <cstdint>

#include "warp_geometry.h"

#ifdef __AVX2__
#include "warp_forward_avx2.h"
#endif

namespace ldr_warp {

// Trilinear values at voxels [begin, n) of a run, all channels: dst[i * channels + c] from
// the batch item's data `src` and the run's axis neighbours. Interpolates along z in the 4
// corner rows, then along y, then along x. Portable scalar code.
inline void InterpolateScalar(const float* __restrict src, const AxisRun axes[3],
                              int64_t channels, int begin, int n, float* __restrict dst) {
  const AxisRun& ax = axes[0];
  const AxisRun& ay = axes[1];
  const AxisRun& az = axes[2];
  for (int i = begin; i < n; ++i) {
    const Corners k = CornersAt(axes, i);
    for (int64_t c = 0; c < channels; ++c) {
      float along_y[2];
      for (int ix = 0; ix < 2; ++ix) {
        float along_z[2];
        for (int iy = 0; iy < 2; ++iy) {
          const float* row = src + k.row[ix][iy] + c;
          along_z[iy] = row[k.z[0]] * az.weight[0][i] + row[k.z[1]] * az.weight[1][i];
        }
        along_y[ix] = along_z[0] * ay.weight[0][i] + along_z[1] * ay.weight[1][i];
      }
      dst[i * channels + c] = along_y[0] * ax.weight[0][i] + along_y[1] * ax.weight[1][i];
    }
  }
}

// Warps runs [first, last) of the batch: out = image sampled at p + flow(p), for
// ChannelCount<kChannels>(g) channels.
template <Padding P, int64_t kChannels>
void WarpRuns(const Grid& g, const float* image, const float* flow, float* out, int64_t first,
              int64_t last) {
  const int64_t channels = ChannelCount<kChannels>(g);
  AxisRun axes[3];
#ifdef __AVX2__
  PairRun pair_run;
#endif
  Run r = RunAt(g, first);
  for (int64_t index = first; index < last; ++index, r = NextRun(g, r)) {
    const float* src = image + r.b * g.voxels() * channels;
    float* dst = out + r.voxel * channels;
    const int n = static_cast<int>(r.n);
    int done = 0;  // voxels of the run already written
#ifdef __AVX2__
    const bool pairs = channels <= 4 && g.nz >= 2;
    if (pairs) done = InterpolatePairRun<P>(g, channels, r, flow, src, &pair_run, dst);
#endif
    if (done == n) continue;
    SetupRun<P, false>(g, channels, r, done, flow, &axes[0], &axes[1], &axes[2]);
#ifdef __AVX2__
    if (!pairs) done = InterpolateChannelVectors(src, axes, channels, n, dst);
#endif
    InterpolateScalar(src, axes, channels, done, n, dst);
  }
}

}  // namespace ldr_warp

#endif  // NETWORK_OPS_WARP_FORWARD_H_
