// The dropout uniform of element `offset`: word offset % 4 of Philox-4x32-10 at counter offset / 4,
// in [0, 1) -- bit-identical to Triton's tl.rand4x(seed, offset / 4) and to dcft_kernels/dropout.py,
// so every backend drops the same elements for the same seed.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace dcft_kernels {

C10_HOST_DEVICE inline uint32_t philox_mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

C10_HOST_DEVICE inline float philox_uniform(int64_t seed, int64_t offset) {
  const int64_t counter = offset >> 2;
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = philox_mulhi(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = philox_mulhi(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const int lane = static_cast<int>(offset & 3);
  int32_t v = static_cast<int32_t>(lane == 0 ? c0 : lane == 1 ? c1 : lane == 2 ? c2 : c3);
  if (v < 0) v = ~v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

}  // namespace dcft_kernels
