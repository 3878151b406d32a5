// What both tile-unit (AMX) kernels need before their first tile instruction: the process's
// permission to use the tile registers, and the layout `ldtilecfg` reads. Each kernel builds
// its own configuration (q4_linear.cpp: integer sums of 8 rows; q4_prompt.cpp: bfloat16
// products of 16 rows) as a constant: built on the stack just before `ldtilecfg` (below the
// stack pointer, in a function that calls none), it faulted on the worker threads.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace dspark_amx {

// Linux hands the tile registers' state only to a process that asks for it (arch_prctl).
inline bool permitted() {
  static const bool granted = [] {
    constexpr int kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr int kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per line of each tile
  uint8_t rows[16] = {};    // lines of each tile
};

}  // namespace dspark_amx
