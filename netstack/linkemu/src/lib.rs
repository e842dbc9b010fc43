//! Link emulator (work in progress).
