/* The entry points stable Rust cannot define (it has no C-variadic definitions), each a few
 * lines forwarding to a Rust function with fixed arguments. */
#define _GNU_SOURCE
#include <stdarg.h>

int nsocket_fcntl(int fd, int cmd, unsigned long arg, int variant);
int nsocket_ioctl(int fd, unsigned long request, unsigned long arg);
void nsocket_load(void);
void nsocket_unload(void);

/* The exported `fcntl` and `fcntl64` are one-jump trampolines in hooks.rs (a symbol defined
 * here would be hidden by the version script rustc gives the cdylib); the jump leaves the
 * caller's registers and stack exactly as they were, so these receive the real variadic call.
 *
 * Every fcntl command takes at most one argument, an int, a pointer or nothing. Reading it as
 * an unsigned long when none was passed is what glibc's own fcntl does: on the SysV x86-64 and
 * AArch64 ABIs it reads a register (or stack slot) the callee may read, and the value is then
 * ignored by the kernel for those commands. */
__attribute__((visibility("hidden"))) int nsocket_fcntl_entry(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    unsigned long arg = va_arg(ap, unsigned long);
    va_end(ap);
    return nsocket_fcntl(fd, cmd, arg, 0);
}

__attribute__((visibility("hidden"))) int nsocket_fcntl64_entry(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    unsigned long arg = va_arg(ap, unsigned long);
    va_end(ap);
    return nsocket_fcntl(fd, cmd, arg, 1);
}

/* ioctl takes at most one argument after the request, an int or a pointer: read as a word for
 * the same reason as fcntl's. */
__attribute__((visibility("hidden"))) int nsocket_ioctl_entry(int fd, unsigned long request, ...) {
    va_list ap;
    va_start(ap, request);
    unsigned long arg = va_arg(ap, unsigned long);
    va_end(ap);
    return nsocket_ioctl(fd, request, arg);
}

/* Reads the environment once, when the library is loaded (before main, and before servers
 * such as nginx clear their workers' environment). */
__attribute__((constructor)) static void nsocket_constructor(void) { nsocket_load(); }

/* Flushes the counters to the agent at exit(). */
__attribute__((destructor)) static void nsocket_destructor(void) { nsocket_unload(); }
