//! Compiles the C entry points stable Rust cannot define: the variadic bodies of
//! `fcntl`/`fcntl64`, and the load-time constructor and exit-time destructor.

fn main() {
    println!("cargo:rerun-if-changed=src/entry.c");
    cc::Build::new()
        .file("src/entry.c")
        .flag_if_supported("-fvisibility=default")
        .warnings(true)
        .extra_warnings(true)
        .compile("nsocket_entry");
}
