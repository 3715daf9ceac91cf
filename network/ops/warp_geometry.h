// Geometry of the trilinear warp, shared by the forward and gradient kernels: the sizes of
// a batch, the runs the work is cut into, and each sample position's neighbours and
// interpolation weights along one axis. No TensorFlow dependency.
//
// Data layout: channel-last, row-major float32 arrays. image [B, X, Y, Z, C], flow
// [B, X, Y, Z, 3] (displacement in voxels; component k moves along axis k + 1), and the
// output and gradients have the shape of image or flow. Element (b, x, y, z, c) of an
// array of C channels is at ((b * X + x) * Y + y) * Z * C + z * C + c.
//
// Work unit: a run, up to kRun consecutive voxels along z within one (b, x, y) row. Runs
// are numbered in that layout's order, so a range of runs is a contiguous range of voxels.
//
// Sample positions p + flow(p) are clamped, floored and weighted as
// network/spatial_transformer.py's warp_tf does. Padding::kBorder clamps a position into
// [0, n - 1] per axis (scipy map_coordinates mode='nearest'; the derivative w.r.t. the
// position is 0 along an axis where the position lies strictly outside); Padding::kZeros
// lets corners outside the volume contribute 0. Non-finite positions: +-inf is clamped like
// any position beyond that face, NaN like one below 0: with kBorder onto the face (NaN onto
// 0), with kZeros to where all corners are outside (the sample is 0). So outputs stay finite
// where warp_tf returns NaN.

#ifndef NETWORK_OPS_WARP_GEOMETRY_H_
#define NETWORK_OPS_WARP_GEOMETRY_H_

#include <algorithm>
#include <cstdint>

namespace ldr_warp {

// What a sample position outside the volume reads (see the top of this file).
enum class Padding { kBorder, kZeros };

constexpr int kRun = 64;  // voxels per work unit along z

// Sizes of a batch of volumes: batch, the three spatial axes, channels.
struct Grid {
  int64_t batch, nx, ny, nz, channels;
  int64_t voxels() const { return nx * ny * nz; }  // voxels of one batch item
  // Element strides of the y and x axes in one batch item of `c` channels (< 2^31, checked).
  int32_t stride_y(int64_t c) const { return static_cast<int32_t>(nz * c); }
  int32_t stride_x(int64_t c) const { return static_cast<int32_t>(ny * nz * c); }
  int64_t runs_per_row() const { return (nz + kRun - 1) / kRun; }
  int64_t runs_per_item() const { return nx * ny * runs_per_row(); }
  int64_t runs() const { return batch * runs_per_item(); }  // runs of the batch
};

// The channel count of a kernel instantiated for kChannels: kChannels when the count is
// fixed at compile time (> 0, so that channel loops unroll), else g.channels.
template <int64_t kChannels>
constexpr int64_t ChannelCount(const Grid& g) {
  return kChannels > 0 ? kChannels : g.channels;
}

// A run: voxels (b, x, y, z0 .. z0 + n - 1); `voxel` is the flat index of the first one in
// the batch, ((b * nx + x) * ny + y) * nz + z0.
struct Run {
  int64_t b, x, y, z0, n, voxel;
};

// Run number `index` of the batch.
inline Run RunAt(const Grid& g, int64_t index) {
  const int64_t per_row = g.runs_per_row();
  const int64_t row = index / per_row;
  Run r;
  r.z0 = (index % per_row) * kRun;
  r.n = std::min<int64_t>(kRun, g.nz - r.z0);
  r.y = row % g.ny;
  r.x = (row / g.ny) % g.nx;
  r.b = row / (g.ny * g.nx);
  r.voxel = row * g.nz + r.z0;
  return r;
}

// The run after r (RunAt(g, index + 1) for r = RunAt(g, index)), without RunAt's divisions.
inline Run NextRun(const Grid& g, Run r) {
  r.voxel += r.n;
  r.z0 += kRun;
  if (r.z0 >= g.nz) {
    r.z0 = 0;
    if (++r.y == g.ny) {
      r.y = 0;
      if (++r.x == g.nx) {
        r.x = 0;
        ++r.b;
      }
    }
  }
  r.n = std::min<int64_t>(kRun, g.nz - r.z0);
  return r;
}

// One axis' neighbours of the sample positions of a run's voxels: the lower ([0]) and
// upper ([1]) grid index, clamped into the volume and multiplied by the axis' stride (an
// element offset into one batch item); their interpolation weights; and the derivatives
// of the weights with respect to the position (1 / voxel).
struct AxisRun {
  int32_t offset[2][kRun];
  float weight[2][kRun];
  float dweight[2][kRun];
};

inline float ClampF(float v, float lo, float hi) {
  v = v > lo ? v : lo;  // NaN becomes lo
  return v < hi ? v : hi;
}

inline int32_t ClampI(int32_t v, int32_t lo, int32_t hi) {
  v = v > lo ? v : lo;
  return v < hi ? v : hi;
}

// Sets entry i of `a` to the neighbours of position `pos` on an axis of `size` voxels and
// element stride `stride`: offsets and weights, and the weights' derivatives only if
// kSlopes (the flow gradient needs them). Branch-free, so that the loop in SetupRun
// vectorises.
template <Padding P, bool kSlopes>
inline void SetNeighbours(float pos, int32_t size, int32_t stride, int i, AxisRun* __restrict a) {
  const float last = static_cast<float>(size - 1);
  // Border: clamp into [0, last]. Zeros: beyond [-2, last + 2] both corners are outside
  // anyway; clamping there only keeps the integer conversion defined.
  const float p = P == Padding::kBorder ? ClampF(pos, 0.f, last) : ClampF(pos, -2.f, last + 2.f);
  const int32_t truncated = static_cast<int32_t>(p);
  const int32_t lo = truncated - (p < static_cast<float>(truncated) ? 1 : 0);  // floor
  const int32_t hi = lo + 1;
  const float t = p - static_cast<float>(lo);
  float in_lo = 1.f, in_hi = 1.f, slope = 1.f;
  if (P == Padding::kBorder) {
    // tf.clip_by_value passes the gradient for 0 <= pos <= last, inclusive.
    slope = static_cast<float>((pos >= 0.f) & (pos <= last));
  } else {
    in_lo = static_cast<float>((lo >= 0) & (lo < size));
    in_hi = static_cast<float>((hi >= 0) & (hi < size));
  }
  a->offset[0][i] = ClampI(lo, 0, size - 1) * stride;
  a->offset[1][i] = ClampI(hi, 0, size - 1) * stride;
  a->weight[0][i] = (1.f - t) * in_lo;
  a->weight[1][i] = t * in_hi;
  if (kSlopes) {
    a->dweight[0][i] = -slope * in_lo;
    a->dweight[1][i] = slope * in_hi;
  }
}

// Neighbours along x, y and z of voxels [begin, n) of run r, as offsets into a batch item
// of `channels` channels (weight derivatives only if kSlopes). One loop reads the three
// flow components of each voxel together, which vectorises far better than three strided
// passes.
template <Padding P, bool kSlopes>
void SetupRun(const Grid& g, int64_t channels, const Run& r, int begin,
              const float* __restrict flow, AxisRun* __restrict ax, AxisRun* __restrict ay,
              AxisRun* __restrict az) {
  const float* __restrict f = flow + 3 * r.voxel;
  const auto nx = static_cast<int32_t>(g.nx);
  const auto ny = static_cast<int32_t>(g.ny);
  const auto nz = static_cast<int32_t>(g.nz);
  const auto stride_z = static_cast<int32_t>(channels);
  const int32_t stride_y = g.stride_y(channels);
  const int32_t stride_x = g.stride_x(channels);
  const auto x = static_cast<float>(r.x);
  const auto y = static_cast<float>(r.y);
  const auto z0 = static_cast<float>(r.z0);
  const int n = static_cast<int>(r.n);
  for (int i = begin; i < n; ++i) {
    SetNeighbours<P, kSlopes>(x + f[3 * i], nx, stride_x, i, ax);
    SetNeighbours<P, kSlopes>(y + f[3 * i + 1], ny, stride_y, i, ay);
    SetNeighbours<P, kSlopes>((z0 + static_cast<float>(i)) + f[3 * i + 2], nz, stride_z, i, az);
  }
}

// Element offsets of voxel i's 8 corners in one batch item: corner (ix, iy, iz), each 0
// (lower) or 1 (upper) neighbour along x, y, z, starts at row[ix][iy] + z[iz].
struct Corners {
  int64_t row[2][2];
  int64_t z[2];
};

inline Corners CornersAt(const AxisRun axes[3], int i) {
  Corners c;
  for (int ix = 0; ix < 2; ++ix) {
    for (int iy = 0; iy < 2; ++iy) {
      c.row[ix][iy] = static_cast<int64_t>(axes[0].offset[ix][i]) + axes[1].offset[iy][i];
    }
  }
  c.z[0] = axes[2].offset[0][i];
  c.z[1] = axes[2].offset[1][i];
  return c;
}

}  // namespace ldr_warp

#endif  // NETWORK_OPS_WARP_GEOMETRY_H_
