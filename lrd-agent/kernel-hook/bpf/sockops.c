// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The kernel hook (lrd-agent/kernel-hook/src/lib.rs): policy's congestion control for every
 * TCP connection of a cgroup, whatever made the socket — Go and static programs the shim
 * cannot reach included. Attached to a workload's cgroup v2 directory by the node agent.
 *
 * - `sockops` (BPF_SOCK_OPS_TCP_CONNECT_CB, before the SYN leaves): looks the destination up
 *   in the workload's table — a longest-prefix trie keyed by (generation, port class,
 *   address), compiled by the agent from the node's snapshot (snapshot/src/kernel_table.rs) —
 *   and sets the congestion control it names. A socket whose process chose its congestion
 *   control itself (the shim does, on the connections it decides) is left alone.
 * - `cgroup/setsockopt`: marks a socket in `chosen` when its process sets TCP_CONGESTION.
 *
 * The agent swaps tables whole: it writes the other generation's port bounds and entries,
 * then flips `state.generation`; a connection reads the generation once.
 *
 * Built by build.rs with clang (-target bpf); loaded with aya.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define SOL_TCP 6
#define TCP_CONGESTION 13
#define PAGE_SIZE 4096

/* Port classes per generation (a power of two: the binary search takes log2 steps). */
#define MAX_CLASSES 256
#define CLASS_SEARCH_STEPS 9
#define MAX_ENTRIES 65536

/* What an entry says (`action`). */
#define LEAVE_DEFAULT 0
#define SET_CONGESTION_CONTROL 1

/* Why entries were skipped on the way to the answer (`skipped`, bits). */
#define SKIPPED_NOT_INTERPOSABLE 1
#define SKIPPED_NO_CAPABILITY 2
#define ISOLATION_FORBIDS 4

/* Counters (`counters`, one slot per CPU each). */
enum counter {
	CONNECTS,
	APPLIED,
	LEFT_DEFAULT,
	CHOSEN_BY_PROCESS,
	NOT_INTERPOSABLE,
	NO_CAPABILITY,
	ISOLATION,
	SET_FAILED,
	NO_ENTRY,
	COUNTERS,
};

/* data: generation, class (big-endian), address (network order), padding. */
struct key4 {
	__u32 prefixlen;
	__u8 data[8];
};

struct key6 {
	__u32 prefixlen;
	__u8 data[20];
};

struct outcome {
	char congestion_control[16];
	__u8 action;
	__u8 skipped;
	__u8 pad[2];
};

struct state {
	__u32 generation;
	__u32 classes[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct key4);
	__type(value, struct outcome);
	__uint(max_entries, MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} table4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct key6);
	__type(value, struct outcome);
	__uint(max_entries, MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} table6 SEC(".maps");

/* Generation g's first ports of the classes at g * MAX_CLASSES. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u16);
	__uint(max_entries, 2 * MAX_CLASSES);
} port_bounds SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct state);
	__uint(max_entries, 1);
} state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, COUNTERS);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} chosen SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &which);
	if (value)
		*value += 1;
}

/* The class of `port`: the last class whose first port is at most `port` (the first is 0). */
static __always_inline __u32 class_of(__u32 generation, __u32 classes, __u16 port)
{
	__u32 low = 0, high = classes;
	for (int step = 0; step < CLASS_SEARCH_STEPS; step++) {
		if (high - low <= 1)
			break;
		__u32 middle = (low + high) / 2;
		__u32 index = generation * MAX_CLASSES + middle;
		__u16 *first = bpf_map_lookup_elem(&port_bounds, &index);
		if (!first)
			break;
		if (*first <= port)
			low = middle;
		else
			high = middle;
	}
	return low;
}

static __always_inline struct outcome *lookup(struct bpf_sock_ops *skops, __u8 generation,
					      __u32 class)
{
	__u32 ip6[4] = {skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
			skops->remote_ip6[3]};
	__u32 ip4 = skops->remote_ip4;
	int v4 = skops->family == AF_INET;
	/* An IPv4-mapped IPv6 destination is the IPv4 one (as the shim's decision has it). */
	if (skops->family == AF_INET6 && ip6[0] == 0 && ip6[1] == 0 &&
	    ip6[2] == bpf_htonl(0xffff)) {
		v4 = 1;
		ip4 = ip6[3];
	}
	if (v4) {
		struct key4 key = {.prefixlen = 24 + 32};
		key.data[0] = generation;
		key.data[1] = class >> 8;
		key.data[2] = class & 0xff;
		__builtin_memcpy(&key.data[3], &ip4, 4);
		return bpf_map_lookup_elem(&table4, &key);
	}
	if (skops->family != AF_INET6)
		return 0;
	struct key6 key = {.prefixlen = 24 + 128};
	key.data[0] = generation;
	key.data[1] = class >> 8;
	key.data[2] = class & 0xff;
	__builtin_memcpy(&key.data[3], ip6, 16);
	return bpf_map_lookup_elem(&table6, &key);
}

SEC("sockops")
int stackroute_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	count(CONNECTS);
	struct bpf_sock *sk = skops->sk;
	if (sk && bpf_sk_storage_get(&chosen, sk, 0, 0)) {
		count(CHOSEN_BY_PROCESS);
		return 1;
	}
	__u32 zero = 0;
	struct state *current = bpf_map_lookup_elem(&state, &zero);
	if (!current) {
		count(NO_ENTRY);
		return 1;
	}
	__u32 generation = current->generation & 1;
	__u32 classes = generation ? current->classes[1] : current->classes[0];
	__u16 port = bpf_ntohl(skops->remote_port);
	__u32 class = class_of(generation, classes, port);
	struct outcome *outcome = lookup(skops, generation, class);
	if (!outcome) {
		count(NO_ENTRY);
		return 1;
	}
	if (outcome->skipped & SKIPPED_NOT_INTERPOSABLE)
		count(NOT_INTERPOSABLE);
	if (outcome->skipped & SKIPPED_NO_CAPABILITY)
		count(NO_CAPABILITY);
	if (outcome->skipped & ISOLATION_FORBIDS)
		count(ISOLATION);
	if (outcome->action != SET_CONGESTION_CONTROL) {
		count(LEFT_DEFAULT);
		return 1;
	}
	char name[16];
	__builtin_memcpy(name, outcome->congestion_control, sizeof name);
	if (bpf_setsockopt(skops, SOL_TCP, TCP_CONGESTION, name, sizeof name) == 0)
		count(APPLIED);
	else
		count(SET_FAILED);
	return 1;
}

SEC("cgroup/setsockopt")
int stackroute_setsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (sk && ctx->level == SOL_TCP && ctx->optname == TCP_CONGESTION)
		bpf_sk_storage_get(&chosen, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	/* Larger values are not copied for programs: 0 tells the kernel to use the caller's. */
	if (ctx->optlen > PAGE_SIZE)
		ctx->optlen = 0;
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
