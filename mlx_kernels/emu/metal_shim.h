// Enough of the Metal Shading Language for our kernel bodies to compile as C++ (tests only).
// Lanes and threads are fibers run by one OS thread; SIMD ops and barriers are their sync points.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Address spaces and function qualifiers mean nothing on the host.
#define device
#define constant
#define thread
#define METAL_FUNC inline
// Threadgroup arrays are shared by every thread of the group: one copy per OS thread suffices
// because threadgroups run one after another. (Declare arrays only, never pointers, with it.)
#define threadgroup static thread_local

typedef uint32_t uint;
typedef uint64_t ulong;
struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };
struct uint4 { uint x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };

// bfloat as Metal has it: the top 16 bits of a float, round-to-nearest-even from float.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;  // NaN stays a (quiet) NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;

namespace metal {
using std::exp;
using std::fabs;
using std::fmax;
using std::fmin;
using std::sqrt;
using std::max;
using std::min;
}  // namespace metal
using namespace metal;

enum class mem_flags { mem_none, mem_device, mem_threadgroup };

namespace emu {

constexpr int SIMD = 32;
enum State { READY, AT_SIMD, AT_BARRIER, DONE };

struct Thread;
typedef void (*Resolve)(Thread* lanes, int n);

struct Thread {
  ucontext_t ctx;
  State state;
  Resolve resolve;
  unsigned char deposit[32];
  unsigned char result[32];
  uint arg;  // the source lane of a shuffle
  uint3 tg_pos, t_pos, grid_pos;
  uint index;
};

struct Group {
  ucontext_t sched;
  std::vector<Thread> threads;
  int cur = 0;
  void (*entry)(void** buffers, const Thread& t, const uint3& tpg, const uint3& ntg) = nullptr;
  void** buffers = nullptr;
  uint3 tpg{}, ntg{};
};

inline thread_local Group* current = nullptr;

inline void wait_at(State s) {
  Thread& t = current->threads[current->cur];
  t.state = s;
  swapcontext(&t.ctx, &current->sched);
}

template <typename V>
V exchange(const V& v, Resolve resolve, uint arg = 0) {
  static_assert(sizeof(V) <= 32, "SIMD value too large for the emulation");
  Thread& t = current->threads[current->cur];
  std::memcpy(t.deposit, &v, sizeof(V));
  t.resolve = resolve;
  t.arg = arg;
  wait_at(AT_SIMD);
  V r;
  std::memcpy(&r, current->threads[current->cur].result, sizeof(V));
  return r;
}

template <typename V>
V load(const Thread& t) {
  V v;
  std::memcpy(&v, t.deposit, sizeof(V));
  return v;
}

template <typename V>
void store(Thread& t, const V& v) {
  std::memcpy(t.result, &v, sizeof(V));
}

inline float add(float a, float b) { return a + b; }
inline int add(int a, int b) { return a + b; }
inline uint add(uint a, uint b) { return a + b; }
inline float2 add(float2 a, float2 b) { return {a.x + b.x, a.y + b.y}; }
inline float4 add(float4 a, float4 b) { return {a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w}; }

// A butterfly over the lanes, as hardware reductions go: every lane ends with the same value.
template <typename V>
void resolve_sum(Thread* lanes, int n) {
  V v[SIMD], w[SIMD];
  for (int i = 0; i < n; i++) v[i] = load<V>(lanes[i]);
  for (int off = SIMD / 2; off >= 1; off >>= 1) {
    for (int i = 0; i < n; i++) w[i] = (i ^ off) < n ? add(v[i], v[i ^ off]) : v[i];
    for (int i = 0; i < n; i++) v[i] = w[i];
  }
  for (int i = 0; i < n; i++) store(lanes[i], v[i]);
}

template <typename V>
void resolve_max(Thread* lanes, int n) {
  V m = load<V>(lanes[0]);
  for (int i = 1; i < n; i++) m = metal::max(m, load<V>(lanes[i]));
  for (int i = 0; i < n; i++) store(lanes[i], m);
}

template <typename V>
void resolve_shuffle(Thread* lanes, int n) {
  V v[SIMD];
  for (int i = 0; i < n; i++) v[i] = load<V>(lanes[i]);
  for (int i = 0; i < n; i++) store(lanes[i], v[lanes[i].arg < uint(n) ? lanes[i].arg : i]);
}

// Runs every threadgroup of the grid; returns an error message, or nullptr.
inline const char* launch(void (*entry)(void**, const Thread&, const uint3&, const uint3&),
                          void** buffers, const uint* grid, const uint* tg) {
  for (int d = 0; d < 3; d++) {
    if (tg[d] == 0 || grid[d] % tg[d] != 0) return "emulation: grid must be a multiple of the threadgroup";
  }
  const int n = int(tg[0] * tg[1] * tg[2]);
  const size_t stack_bytes = 256 * 1024;
  std::vector<char> stacks(size_t(n) * stack_bytes);
  Group g;
  g.threads.resize(n);
  g.entry = entry;
  g.buffers = buffers;
  g.tpg = {tg[0], tg[1], tg[2]};
  g.ntg = {grid[0] / tg[0], grid[1] / tg[1], grid[2] / tg[2]};
  Group* saved = current;
  current = &g;
  const char* error = nullptr;
  auto trampoline = +[]() {
    Group* G = current;
    Thread& t = G->threads[G->cur];
    G->entry(G->buffers, t, G->tpg, G->ntg);
    G->threads[G->cur].state = DONE;  // then uc_link returns to the scheduler
  };
  for (uint gz = 0; gz < g.ntg.z && !error; gz++)
    for (uint gy = 0; gy < g.ntg.y && !error; gy++)
      for (uint gx = 0; gx < g.ntg.x && !error; gx++) {
        for (int i = 0; i < n; i++) {
          Thread& t = g.threads[i];
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = stacks.data() + size_t(i) * stack_bytes;
          t.ctx.uc_stack.ss_size = stack_bytes;
          t.ctx.uc_link = &g.sched;
          makecontext(&t.ctx, trampoline, 0);
          t.state = READY;
          t.index = uint(i);
          t.t_pos = {uint(i) % tg[0], (uint(i) / tg[0]) % tg[1], uint(i) / (tg[0] * tg[1])};
          t.tg_pos = {gx, gy, gz};
          t.grid_pos = {gx * tg[0] + t.t_pos.x, gy * tg[1] + t.t_pos.y, gz * tg[2] + t.t_pos.z};
        }
        for (;;) {
          for (int i = 0; i < n; i++) {
            if (g.threads[i].state == READY) {
              g.cur = i;
              swapcontext(&g.sched, &g.threads[i].ctx);
            }
          }
          bool resumed = false;
          int live = 0, waiting = 0;
          for (int s = 0; s < n && !error; s += SIMD) {
            const int lanes = n - s < SIMD ? n - s : SIMD;
            int at_simd = 0;
            for (int i = s; i < s + lanes; i++) at_simd += g.threads[i].state == AT_SIMD;
            if (at_simd == 0) continue;
            if (at_simd != lanes) {
              error = "emulation: a SIMD operation reached by only some lanes of a simdgroup";
              break;
            }
            for (int i = s + 1; i < s + lanes; i++) {
              if (g.threads[i].resolve != g.threads[s].resolve) {
                error = "emulation: lanes of a simdgroup at different SIMD operations";
              }
            }
            if (error) break;
            g.threads[s].resolve(&g.threads[s], lanes);
            for (int i = s; i < s + lanes; i++) g.threads[i].state = READY;
            resumed = true;
          }
          if (error) break;
          for (int i = 0; i < n; i++) {
            live += g.threads[i].state != DONE;
            waiting += g.threads[i].state == AT_BARRIER;
          }
          if (live == 0) break;
          if (waiting == live && waiting != n) {
            error = "emulation: a threadgroup barrier after some threads returned";
            break;
          }
          if (waiting == live) {
            for (int i = 0; i < n; i++) g.threads[i].state = READY;
          } else if (!resumed) {
            error = "emulation: threads wait at a barrier that others never reach";
            break;
          }
        }
      }
  current = saved;
  return error;
}

}  // namespace emu

template <typename V> V simd_sum(V v) { return emu::exchange(v, &emu::resolve_sum<V>); }
template <typename V> V simd_max(V v) { return emu::exchange(v, &emu::resolve_max<V>); }
template <typename V> V simd_shuffle(V v, uint lane) {
  return emu::exchange(v, &emu::resolve_shuffle<V>, lane);
}
template <typename V> V simd_shuffle_xor(V v, uint mask) {
  const uint me = emu::current->threads[emu::current->cur].index % emu::SIMD;
  return emu::exchange(v, &emu::resolve_shuffle<V>, me ^ mask);
}
inline void threadgroup_barrier(mem_flags) { emu::wait_at(emu::AT_BARRIER); }
