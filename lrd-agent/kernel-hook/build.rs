//! Builds the kernel hook (`bpf/sockops.c`) for the BPF target; the object is embedded in the
//! crate and loaded with aya at run time.

fn main() {
    stackroute_bpf_build::compile("bpf/sockops.c", "sockops.o");
}
