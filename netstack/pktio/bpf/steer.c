// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The AF_XDP engine's steering program (netstack/pktio/src/af_xdp.rs): frames for the stack's
 * own IPv4 address go to the AF_XDP socket of their receive queue, everything else to the
 * kernel, so stack and kernel share one interface. "For the stack" means an IPv4 packet to
 * the address, or an ARP packet whose target protocol address is it. User space writes the
 * address into `config` and the socket into `xsks` before attaching.
 *
 * Built by build.rs with clang (-target bpf); loaded with aya.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32); /* The stack's IPv4 address, network byte order. */
} config SEC(".maps");

/* An ARP packet for Ethernet and IPv4 (RFC 826). Spelled out here: <linux/if_arp.h> pulls in
 * libc headers, which a BPF target does not have. */
struct arp_ipv4 {
	__be16 hardware_type;
	__be16 protocol_type;
	__u8 hardware_len;
	__u8 protocol_len;
	__be16 operation;
	__u8 sender_mac[ETH_ALEN];
	__u32 sender_ip;
	__u8 target_mac[ETH_ALEN];
	__u32 target_ip;
} __attribute__((packed));

SEC("xdp")
int steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 key = 0;
	__u32 *ours;
	__u32 target;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	ours = bpf_map_lookup_elem(&config, &key);
	if (!ours)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end)
			return XDP_PASS;
		target = ip->daddr;
	} else if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		struct arp_ipv4 *arp = (void *)(eth + 1);

		if ((void *)(arp + 1) > end)
			return XDP_PASS;
		target = arp->target_ip;
	} else {
		return XDP_PASS;
	}
	if (target != *ours)
		return XDP_PASS;
	/* No socket on this queue: the kernel keeps the frame. */
	return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
