//! Builds the XDP steering program (`bpf/steer.c`) for the BPF target; the object is embedded in
//! the crate and loaded with aya at run time.

fn main() {
    stackroute_bpf_build::compile("bpf/steer.c", "steer.o");
}
