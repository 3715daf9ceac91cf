// AVX2 + FMA paths of the forward interpolation; warp_forward.h includes this header only
// when compiled with -mavx2 -mfma (build.py adds them on CPUs that have both). No
// TensorFlow dependency.
//
// Runs of one to four channels on volumes of two or more voxels along z are interpolated 8
// voxels at a time in two passes over the run. The first, SetupPairs, computes neighbours
// and weights in registers straight from the flow (bit-identical to SetupRun's) and stores
// them in a PairRun. The second reads each corner row's two z neighbours with one load:
// InterpolatePairs (one channel) with an 8-byte broadcast per voxel, InterpolateChannelPairs
// (two to four channels) with one 8-float load per voxel that holds the pair's 2C floats;
// its order of operations rounds differently from the separable one by a few float ulp.
// The passes are split so that the second pass's loads do not wait on the first pass's
// arithmetic; the loads are plain loads rather than AVX2 gathers, which are slower.
// Where the 8 voxels of a group all have their upper x and y neighbours one stride above
// the lower ones (everywhere but at the faces; PairRun::full_steps), the second pass reads
// one row start per voxel and reaches the other three rows by the strides. It also
// prefetches the rows of the voxels just ahead and the image rows that the output rows two
// y steps on will read first (kRowsAhead). Other channel counts, and volumes of depth 1, use
// InterpolateChannelVectors: 4 channels at a time per voxel. The pair paths leave a run's
// voxels past its last full group of 8 to the scalar code. All paths read the same corners
// with the same per-axis weights.

#ifndef NETWORK_OPS_WARP_FORWARD_AVX2_H_
#define NETWORK_OPS_WARP_FORWARD_AVX2_H_

#ifndef __AVX2__
#error "warp_forward_avx2.h needs -mavx2 -mfma"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "warp_geometry.h"

namespace ldr_warp {

// a * wa + b * wb, lane-wise (8 and 4 lanes).
inline __m256 Lerp8(__m256 a, __m256 wa, __m256 b, __m256 wb) {
  return _mm256_fmadd_ps(b, wb, _mm256_mul_ps(a, wa));
}

inline __m128 Lerp4(__m128 a, __m128 wa, __m128 b, __m128 wb) {
  return _mm_fmadd_ps(b, wb, _mm_mul_ps(a, wa));
}

// The float pair src[i], src[i + 1], repeated in all four 64-bit lanes. A broadcast from
// memory is a plain load: it needs no shuffle unit.
inline __m256 BroadcastPair(const float* src, uint64_t i) {
  return _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(src + i)));
}

// For 8 voxels with pair starts start[0..7] (>= 0): *lower = {src[start[v]]}, *upper =
// {src[start[v] + 1]}, voxel v in lane v.
inline void LoadPairs8(const float* src, const int32_t* start, __m256* lower, __m256* upper) {
  // The starts are read two at a time (one 8-byte load, split by a shift), so that the 8
  // loads of the data and the 4 of the starts share the two load ports.
  uint64_t two[4];
  for (int k = 0; k < 4; ++k) std::memcpy(&two[k], start + 2 * k, sizeof(uint64_t));
  auto pair = [&](int v) {
    const uint64_t offset = v % 2 ? two[v / 2] >> 32 : two[v / 2] & 0xFFFFFFFFu;
    return BroadcastPair(src, offset);
  };
  // Voxels 0, 1 | 4, 5 in a and 2, 3 | 6, 7 in b (64-bit lanes 0, 1 | 2, 3), blended from
  // broadcasts; the shuffles take elements 0, 2 (lower) or 1, 3 (upper) of a, then of b,
  // per 128-bit lane.
  auto four = [&](int v0, int v1, int v2, int v3) {
    return _mm256_blend_ps(_mm256_blend_ps(pair(v0), pair(v1), 0x0C),
                           _mm256_blend_ps(pair(v2), pair(v3), 0xC0), 0xF0);
  };
  const __m256 a = four(0, 1, 4, 5);
  const __m256 b = four(2, 3, 6, 7);
  *lower = _mm256_shuffle_ps(a, b, 0x88);
  *upper = _mm256_shuffle_ps(a, b, 0xDD);
}

// The x, y and z components of 8 voxels' flows, flow[0 .. 23] stored xyz, xyz, ...: in
// the three vectors loaded, component k of voxel v sits at position 3v + k. The lanes
// holding x (or y, z) components are distinct across the three vectors, so two blends
// collect them into one vector and a permutation puts voxel v into lane v.
inline void LoadFlow8(const float* flow, __m256* fx, __m256* fy, __m256* fz) {
  const __m256 a = _mm256_loadu_ps(flow);       // x0 y0 z0 x1 y1 z1 x2 y2
  const __m256 b = _mm256_loadu_ps(flow + 8);   // z2 x3 y3 z3 x4 y4 z4 x5
  const __m256 c = _mm256_loadu_ps(flow + 16);  // y5 z5 x6 y6 z6 x7 y7 z7
  const __m256 x = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x92), c, 0x24);  // x0 x3 x6 x1 ..
  const __m256 y = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x24), c, 0x49);  // y5 y0 y3 y6 ..
  const __m256 z = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x49), c, 0x92);  // z2 z5 z0 z3 ..
  *fx = _mm256_permutevar8x32_ps(x, _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  *fy = _mm256_permutevar8x32_ps(y, _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6));
  *fz = _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
}

// One axis' neighbours of 8 sample positions, lane-wise as SetNeighbours computes them:
// the lower ([0]) and upper ([1]) grid index clamped into the volume (not multiplied by
// a stride) and their interpolation weights.
struct Axis8 {
  __m256i index[2];
  __m256 weight[2];
};

template <Padding P>
inline Axis8 Neighbours8(__m256 pos, int32_t size) {
  const float last = static_cast<float>(size - 1);
  const __m256i last_index = _mm256_set1_epi32(size - 1);
  Axis8 a;
  if (P == Padding::kBorder) {
    // max_ps returns its second operand when the first is NaN: NaN becomes 0, as in ClampF.
    // The clamped position is >= 0, so truncation is the floor and lies in [0, size - 1].
    const __m256 p = _mm256_min_ps(_mm256_max_ps(pos, _mm256_setzero_ps()), _mm256_set1_ps(last));
    a.index[0] = _mm256_cvttps_epi32(p);
    a.index[1] = _mm256_min_epi32(_mm256_add_epi32(a.index[0], _mm256_set1_epi32(1)), last_index);
    a.weight[1] = _mm256_sub_ps(p, _mm256_cvtepi32_ps(a.index[0]));
    a.weight[0] = _mm256_sub_ps(_mm256_set1_ps(1.f), a.weight[1]);
    return a;
  }
  // Zeros: as in SetNeighbours, positions are clamped into [-2, last + 2].
  const __m256 p = _mm256_min_ps(_mm256_max_ps(pos, _mm256_set1_ps(-2.f)),
                                 _mm256_set1_ps(last + 2.f));
  const __m256 lo_f = _mm256_floor_ps(p);
  const __m256i lo = _mm256_cvttps_epi32(lo_f);
  const __m256i corner[2] = {lo, _mm256_add_epi32(lo, _mm256_set1_epi32(1))};
  const __m256 t = _mm256_sub_ps(p, lo_f);
  a.weight[0] = _mm256_sub_ps(_mm256_set1_ps(1.f), t);
  a.weight[1] = t;
  for (int k = 0; k < 2; ++k) {
    a.index[k] = _mm256_min_epi32(_mm256_max_epi32(corner[k], _mm256_setzero_si256()), last_index);
    // A corner outside the volume (moved by the clamp) gets weight +0, as
    // (weight >= 0) * 0 in SetNeighbours.
    const __m256i inside = _mm256_cmpeq_epi32(corner[k], a.index[k]);
    a.weight[k] = _mm256_and_ps(a.weight[k], _mm256_castsi256_ps(inside));
  }
  return a;
}

// What the interpolation needs of a run's voxels, computed 8 voxels at a time and kept in
// memory, so that the loads of the second pass do not wait on the arithmetic of the first.
// Each voxel's two z neighbours lie in the pair q, q + 1 with q = min(lower z index,
// nz - 2), so one load per corner row reads both: 2 floats for one channel, 2C for C.
// `pair_weight` is the weight of element q ([0]) and q + 1 ([1]): the sum of the z
// neighbours' weights that fall on it. When both neighbours fall on one element the
// other's weight is 0 (clamping only merges them where the position is on or beyond the
// last voxel, whose upper weight is 0, or where a neighbour lies outside with "zeros"), so
// each sum equals a single weight exactly and a q, q + 1 blend of the pair equals the
// z interpolation of the neighbours. One channel interpolates along y and x with
// `axis_weight`; two to four channels weight each corner row by `row_weight`.
// `full_steps[k]`: voxels 8k .. 8k + 7 all have start[ix][iy] = start[0][0] + ix stride_x +
// iy stride_y (no upper x or y neighbour clamped onto the lower one).
struct PairRun {
  alignas(32) int32_t start[2][2][kRun];  // [ix][iy]: element offset of corner row's pair
  alignas(32) float pair_weight[2][kRun];
  alignas(32) float axis_weight[2][2][kRun];  // [x / y][lower / upper neighbour]
  alignas(32) float row_weight[2][2][kRun];   // [ix][iy]: x weight times y weight
  bool full_steps[kRun / 8];
};

// Voxels ahead of the current group whose flow SetupPairs prefetches (four runs).
constexpr int64_t kFlowAhead = 4 * kRun;

// First pass (nz >= 2): PairRun entries of voxels [0, n & ~7) of run r for an image of
// `channels` channels, computed in registers straight from the flow with SetupRun's
// neighbours and weights; row_weight if kRowWeights, else axis_weight. Returns n & ~7.
template <Padding P, bool kRowWeights>
inline int SetupPairs(const Grid& g, int64_t channels, const Run& r, const float* __restrict flow,
                      PairRun* __restrict run) {
  const auto ny = static_cast<int32_t>(g.ny);
  const auto nz = static_cast<int32_t>(g.nz);
  const auto c = static_cast<int32_t>(channels);
  const __m256i stride_x = _mm256_set1_epi32(g.stride_x(channels));
  const __m256i stride_y = _mm256_set1_epi32(g.stride_y(channels));
  const __m256i last_pair = _mm256_set1_epi32(nz - 2);
  const __m256 x = _mm256_set1_ps(static_cast<float>(r.x));
  const __m256 y = _mm256_set1_ps(static_cast<float>(r.y));
  const __m256 lanes = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  const float* __restrict f = flow + 3 * r.voxel;
  const int64_t flow_last = 3 * g.batch * g.voxels() - 1;
  const int end = static_cast<int>(r.n) & ~7;
  for (int i = 0; i < end; i += 8) {
    // The 96 bytes of flow of the group kFlowAhead voxels on, one prefetch per 64-byte line.
    for (int64_t line = 0; line < 2; ++line) {
      const int64_t ahead = 3 * (r.voxel + i + kFlowAhead) + 16 * line;
      _mm_prefetch(reinterpret_cast<const char*>(flow + std::min(ahead, flow_last)), _MM_HINT_T0);
    }
    __m256 fx, fy, fz;
    LoadFlow8(f + 3 * i, &fx, &fy, &fz);
    const Axis8 axes[3] = {
        Neighbours8<P>(_mm256_add_ps(x, fx), static_cast<int32_t>(g.nx)),
        Neighbours8<P>(_mm256_add_ps(y, fy), ny),
        // z of voxel i + v: (z0 + i) + v, exact in float as in SetupRun.
        Neighbours8<P>(
            _mm256_add_ps(_mm256_add_ps(_mm256_set1_ps(static_cast<float>(r.z0 + i)), lanes), fz),
            nz)};
    const __m256i q = _mm256_min_epi32(axes[2].index[0], last_pair);
    // A z neighbour is element q + 1 exactly when its index exceeds q.
    const __m256 lower_up = _mm256_castsi256_ps(_mm256_cmpgt_epi32(axes[2].index[0], q));
    const __m256 upper_up = _mm256_castsi256_ps(_mm256_cmpgt_epi32(axes[2].index[1], q));
    _mm256_store_ps(run->pair_weight[0] + i,
                    _mm256_add_ps(_mm256_andnot_ps(lower_up, axes[2].weight[0]),
                                  _mm256_andnot_ps(upper_up, axes[2].weight[1])));
    _mm256_store_ps(run->pair_weight[1] + i,
                    _mm256_add_ps(_mm256_and_ps(lower_up, axes[2].weight[0]),
                                  _mm256_and_ps(upper_up, axes[2].weight[1])));
    for (int k = 0; k < 2; ++k) {
      if (kRowWeights) {
        for (int iy = 0; iy < 2; ++iy) {
          _mm256_store_ps(run->row_weight[k][iy] + i,
                          _mm256_mul_ps(axes[0].weight[k], axes[1].weight[iy]));
        }
      } else {
        for (int a = 0; a < 2; ++a) _mm256_store_ps(run->axis_weight[a][k] + i, axes[a].weight[k]);
      }
    }
    // Upper neighbours are the lower ones or one further, so a row offset steps by a full
    // stride or not at all: (lower - upper) is -1 (all bits) or 0, a mask for the stride.
    const __m256i q_elements = c == 1 ? q : _mm256_mullo_epi32(q, _mm256_set1_epi32(c));
    const __m256i base = _mm256_add_epi32(
        _mm256_add_epi32(_mm256_mullo_epi32(axes[0].index[0], stride_x),
                         _mm256_mullo_epi32(axes[1].index[0], stride_y)),
        q_elements);
    const __m256i step_x =
        _mm256_and_si256(_mm256_sub_epi32(axes[0].index[0], axes[0].index[1]), stride_x);
    const __m256i step_y =
        _mm256_and_si256(_mm256_sub_epi32(axes[1].index[0], axes[1].index[1]), stride_y);
    run->full_steps[i / 8] =
        _mm256_movemask_epi8(_mm256_and_si256(_mm256_cmpeq_epi32(step_x, stride_x),
                                              _mm256_cmpeq_epi32(step_y, stride_y))) == -1;
    for (int ix = 0; ix < 2; ++ix) {
      const __m256i row_x = ix ? _mm256_add_epi32(base, step_x) : base;
      for (int iy = 0; iy < 2; ++iy) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(run->start[ix][iy] + i),
                           iy ? _mm256_add_epi32(row_x, step_y) : row_x);
      }
    }
  }
  return end;
}

// The image rows an output row reads first are its upper-y corner rows: L2 still holds the
// others from the output row and plane before, and the hardware prefetcher does not fetch the
// new ones in time. So each group of 8 voxels prefetches into L2 the upper-x row kRowsAhead
// y rows past its lower corner row, where the output row two y steps on will read (where the
// flow there is alike).
constexpr int kRowsAhead = 3;

// Prefetches `lines` 64-byte lines (1 or 2) into L2 for the group whose first voxel's lower
// corner row starts at element `start` of a batch item of `item` floats (see kRowsAhead).
inline void PrefetchRowsAhead(const float* src, int64_t item, int32_t start, int32_t stride_x,
                              int32_t stride_y, int lines) {
  const int64_t ahead = static_cast<int64_t>(start) + kRowsAhead * static_cast<int64_t>(stride_y) +
                        stride_x;
  for (int line = 0; line < lines; ++line) {
    const int64_t element = std::min(ahead + 16 * line, item - 1);
    _mm_prefetch(reinterpret_cast<const char*>(src + element), _MM_HINT_T1);
  }
}

// Second pass: trilinear values at voxels [0, end) (a multiple of 8) from the PairRun
// (axis_weight), one channel, 8 voxels at a time: along z, then y, then x. stride_x and
// stride_y are the image's element strides (rows reached from start[0][0] on full_steps);
// `item` is the number of floats in src. Each group prefetches the rows kRowsAhead on.
inline void InterpolatePairs(const float* __restrict src, int64_t item, int32_t stride_x,
                             int32_t stride_y, const PairRun& run, int end,
                             float* __restrict dst) {
  auto eight = [&](int i, auto full) {
    const __m256 on_q = _mm256_load_ps(run.pair_weight[0] + i);
    const __m256 on_next = _mm256_load_ps(run.pair_weight[1] + i);
    auto weight = [&](int axis, int k) { return _mm256_load_ps(run.axis_weight[axis][k] + i); };
    __m256 along_y[2];
    for (int ix = 0; ix < 2; ++ix) {
      __m256 along_z[2];
      for (int iy = 0; iy < 2; ++iy) {
        __m256 lower, upper;
        if (decltype(full)::value) {
          const float* row = src + (ix ? stride_x : 0) + (iy ? stride_y : 0);
          LoadPairs8(row, run.start[0][0] + i, &lower, &upper);
        } else {
          LoadPairs8(src, run.start[ix][iy] + i, &lower, &upper);
        }
        along_z[iy] = Lerp8(lower, on_q, upper, on_next);
      }
      along_y[ix] = Lerp8(along_z[0], weight(1, 0), along_z[1], weight(1, 1));
    }
    _mm256_storeu_ps(dst + i, Lerp8(along_y[0], weight(0, 0), along_y[1], weight(0, 1)));
  };
  for (int i = 0; i < end; i += 8) {
    PrefetchRowsAhead(src, item, run.start[0][0][i], stride_x, stride_y, 1);
    if (run.full_steps[i / 8]) {
      eight(i, std::true_type());
    } else {
      eight(i, std::false_type());
    }
  }
}

// Second pass for kC = 2, 3 or 4 channels: trilinear values at voxels [0, end) from the
// PairRun (row_weight); `item` is the number of floats in src. One voxel at a time, each
// corner row's pair (2 kC floats) is read with one 8-float load (element q's channels in
// lanes [0, kC), q + 1's in [kC, 2 kC)); the four rows are summed with their x-y weights,
// and the sum's two halves are added, weighted by the pair weights. This
// order rounds differently from the separable one (by a few float ulp of the value). A
// load that would reach past src is masked to the 2 kC floats. Each voxel is stored as 4
// floats; the surplus ones fall on the run's next voxel, which is written after it, and
// the run's last voxel is stored masked, so no other run's output is touched. Groups of 8
// voxels that need neither (all but the run's last group, away from the item's end) skip
// those checks. Each group prefetches the corner rows of its voxels 16 and 21 on (their
// lines cover the group two on) and the rows kRowsAhead on. stride_x and stride_y as
// in InterpolatePairs.
template <int kC>
inline void InterpolateChannelPairs(const float* __restrict src, int64_t item, int32_t stride_x,
                                    int32_t stride_y, const PairRun& run, int end,
                                    float* __restrict dst) {
  static_assert(kC >= 2 && kC <= 4, "2 kC floats must fit one 8-float vector");
  constexpr int kPrefetch = 16;  // voxels ahead whose corner rows are prefetched
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i pair_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(2 * kC), lanes);
  const __m256i fold = _mm256_add_epi32(lanes, _mm256_set1_epi32(kC));  // lane k <- lane k + kC
  const __m128i store_mask = _mm_cmpgt_epi32(_mm_set1_epi32(kC), _mm_setr_epi32(0, 1, 2, 3));
  const int64_t diagonal = static_cast<int64_t>(stride_x) + stride_y;
  // Voxel i; `checked` (a bool constant type): mask a load past src or the run's last store.
  auto voxel = [&](int i, auto full, auto checked) {
    const float* rows[2][2];
    if (decltype(full)::value) {
      rows[0][0] = src + run.start[0][0][i];
      rows[0][1] = rows[0][0] + stride_y;
      rows[1][0] = rows[0][0] + stride_x;
      rows[1][1] = rows[0][0] + diagonal;
    } else {
      for (int ix = 0; ix < 2; ++ix) {
        for (int iy = 0; iy < 2; ++iy) rows[ix][iy] = src + run.start[ix][iy][i];
      }
    }
    // rows[1][1] is the largest of the four.
    const bool inside = !decltype(checked)::value || rows[1][1] + 8 <= src + item;
    __m256 sum = _mm256_setzero_ps();
    for (int ix = 0; ix < 2; ++ix) {
      for (int iy = 0; iy < 2; ++iy) {
        const float* pair = rows[ix][iy];
        sum = _mm256_fmadd_ps(inside ? _mm256_loadu_ps(pair) : _mm256_maskload_ps(pair, pair_mask),
                              _mm256_set1_ps(run.row_weight[ix][iy][i]), sum);
      }
    }
    const __m128 value = _mm256_castps256_ps128(
        _mm256_fmadd_ps(_mm256_permutevar8x32_ps(sum, fold), _mm256_set1_ps(run.pair_weight[1][i]),
                        _mm256_mul_ps(sum, _mm256_set1_ps(run.pair_weight[0][i]))));
    if (!decltype(checked)::value || i + 1 < end) {
      _mm_storeu_ps(dst + i * kC, value);
    } else {
      _mm_maskstore_ps(dst + i * kC, store_mask, value);
    }
  };
  // A full group's loads stay inside src if all its starts are <= last_start.
  const __m256i last_start = _mm256_set1_epi32(static_cast<int32_t>(item - 8 - diagonal));
  for (int group = 0; group < end; group += 8) {
    for (int v : {kPrefetch, kPrefetch + 5}) {
      const float* ahead = src + run.start[0][0][std::min(group + v, end - 1)];
      for (const float* row : {ahead, ahead + stride_y, ahead + stride_x, ahead + diagonal}) {
        _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0);
      }
    }
    PrefetchRowsAhead(src, item, run.start[0][0][group], stride_x, stride_y, 2);
    const __m256i past = _mm256_cmpgt_epi32(
        _mm256_load_si256(reinterpret_cast<const __m256i*>(run.start[0][0] + group)), last_start);
    const bool full = run.full_steps[group / 8];
    if (full && group + 8 < end && _mm256_testz_si256(past, past)) {
      for (int i = group; i < group + 8; ++i) voxel(i, std::true_type(), std::false_type());
    } else if (full) {
      for (int i = group; i < group + 8; ++i) voxel(i, std::true_type(), std::true_type());
    } else {
      for (int i = group; i < group + 8; ++i) voxel(i, std::false_type(), std::true_type());
    }
  }
}

// Any channel count: trilinear values at all n voxels of a run, 4 channels at a time
// (masked loads and stores for the last, partial group).
inline int InterpolateChannelVectors(const float* __restrict src, const AxisRun axes[3],
                                     int64_t channels, int n, float* __restrict dst) {
  const AxisRun& ax = axes[0];
  const AxisRun& ay = axes[1];
  const AxisRun& az = axes[2];
  for (int i = 0; i < n; ++i) {
    const Corners k = CornersAt(axes, i);
    for (int64_t c = 0; c < channels; c += 4) {
      const __m128i mask = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int32_t>(channels - c)),
                                           _mm_setr_epi32(0, 1, 2, 3));
      __m128 along_y[2];
      for (int ix = 0; ix < 2; ++ix) {
        __m128 along_z[2];
        for (int iy = 0; iy < 2; ++iy) {
          const float* row = src + k.row[ix][iy] + c;
          along_z[iy] = Lerp4(_mm_maskload_ps(row + k.z[0], mask), _mm_set1_ps(az.weight[0][i]),
                              _mm_maskload_ps(row + k.z[1], mask), _mm_set1_ps(az.weight[1][i]));
        }
        along_y[ix] = Lerp4(along_z[0], _mm_set1_ps(ay.weight[0][i]), along_z[1],
                            _mm_set1_ps(ay.weight[1][i]));
      }
      _mm_maskstore_ps(dst + i * channels + c, mask,
                       Lerp4(along_y[0], _mm_set1_ps(ax.weight[0][i]), along_y[1],
                             _mm_set1_ps(ax.weight[1][i])));
    }
  }
  return n;
}

// Both passes of the pair paths over run r (1 to 4 channels, nz >= 2): writes voxels
// [0, n & ~7) of the run's output `dst` from `src`, its batch item of the image, and returns
// n & ~7. `pair_run` is scratch.
template <Padding P>
inline int InterpolatePairRun(const Grid& g, int64_t channels, const Run& r, const float* flow,
                              const float* src, PairRun* pair_run, float* dst) {
  const int done = channels == 1 ? SetupPairs<P, false>(g, channels, r, flow, pair_run)
                                 : SetupPairs<P, true>(g, channels, r, flow, pair_run);
  const int64_t item = g.voxels() * channels;
  const int32_t sx = g.stride_x(channels);
  const int32_t sy = g.stride_y(channels);
  switch (channels) {
    case 1: InterpolatePairs(src, item, sx, sy, *pair_run, done, dst); break;
    case 2: InterpolateChannelPairs<2>(src, item, sx, sy, *pair_run, done, dst); break;
    case 3: InterpolateChannelPairs<3>(src, item, sx, sy, *pair_run, done, dst); break;
    default: InterpolateChannelPairs<4>(src, item, sx, sy, *pair_run, done, dst); break;
  }
  return done;
}

}  // namespace ldr_warp

#endif  // NETWORK_OPS_WARP_FORWARD_AVX2_H_
