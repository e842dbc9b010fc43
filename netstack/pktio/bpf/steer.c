// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The AF_XDP engine's steering program (netstack/pktio/src/af_xdp.rs): frames for the stack go
 * to the AF_XDP socket of their receive queue, everything else to the kernel, so stack and
 * kernel share one interface. Two ways to say "for the stack", set in `config`:
 *
 * - the whole address (the stack owns an IPv4 address of its own): IPv4 packets to it and ARP
 *   packets asking for it;
 * - a port range on a shared address (the stack instance of a pod shares the pod's IPv4 and
 *   IPv6 addresses with the kernel): TCP segments to either address whose destination port is
 *   in the range (the stack's connections) or whose source port is (clients of another stack
 *   instance reaching a dual-listening server here). ARP and neighbour discovery stay with the
 *   kernel, which owns the address; the stack reads their copies from a packet socket.
 *
 * `xdp.frags`: a TCP segmentation aggregate from a local sender (up to 64 KiB on a veth) is
 * handed over in 2 KiB pieces instead of being dropped.
 *
 * Built by build.rs with clang (-target bpf); loaded with aya.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

/* Written by user space before attaching; mirrored by `SteerConfig` in src/steer.rs. */
struct steer_config {
	__u32 address4;     /* network byte order; 0: none */
	__u32 address6[4];  /* network byte order; all zero: none */
	__u16 port_low;     /* host byte order; both zero: the whole IPv4 address */
	__u16 port_high;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct steer_config);
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

static __always_inline int in_range(const struct steer_config *c, __be16 port)
{
	__u16 p = bpf_ntohs(port);

	return p >= c->port_low && p <= c->port_high;
}

/* TCP at `l4` with ports in the range (either direction). */
static __always_inline int ours_by_port(const struct steer_config *c, void *l4, void *end)
{
	struct tcphdr *tcp = l4;

	if ((void *)(tcp + 1) > end)
		return 0;
	return in_range(c, tcp->dest) || in_range(c, tcp->source);
}

static __always_inline int steer_ipv4(const struct steer_config *c, struct iphdr *ip, void *end)
{
	if ((void *)(ip + 1) > end || c->address4 == 0 || ip->daddr != c->address4)
		return 0;
	if (c->port_low == 0 && c->port_high == 0)
		return 1;
	if (ip->protocol != IPPROTO_TCP || ip->ihl < 5)
		return 0;
	/* A fragment's ports are not where they would be; fragments stay with the kernel. */
	if (ip->frag_off & bpf_htons(0x3fff))
		return 0;
	return ours_by_port(c, (void *)ip + ip->ihl * 4, end);
}

static __always_inline int steer_ipv6(const struct steer_config *c, struct ipv6hdr *ip, void *end)
{
	if ((void *)(ip + 1) > end || (c->port_low == 0 && c->port_high == 0))
		return 0;
	if (!(c->address6[0] | c->address6[1] | c->address6[2] | c->address6[3]))
		return 0;
	if (ip->daddr.in6_u.u6_addr32[0] != c->address6[0] ||
	    ip->daddr.in6_u.u6_addr32[1] != c->address6[1] ||
	    ip->daddr.in6_u.u6_addr32[2] != c->address6[2] ||
	    ip->daddr.in6_u.u6_addr32[3] != c->address6[3])
		return 0;
	/* The stack sends no extension headers; a segment carrying them stays with the kernel. */
	if (ip->nexthdr != IPPROTO_TCP)
		return 0;
	return ours_by_port(c, ip + 1, end);
}

SEC("xdp.frags")
int steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct steer_config *c;
	__u32 key = 0;
	int ours = 0;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	c = bpf_map_lookup_elem(&config, &key);
	if (!c)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		ours = steer_ipv4(c, (void *)(eth + 1), end);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		ours = steer_ipv6(c, (void *)(eth + 1), end);
	} else if (eth->h_proto == bpf_htons(ETH_P_ARP) && c->port_low == 0 && c->port_high == 0) {
		struct arp_ipv4 *arp = (void *)(eth + 1);

		ours = (void *)(arp + 1) <= end && c->address4 != 0 && arp->target_ip == c->address4;
	}
	if (!ours)
		return XDP_PASS;
	/* No socket on this queue: the kernel keeps the frame. */
	return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
}

/*
 * Socket filter for the packet socket beside the AF_XDP socket of a stack on a shared address:
 * only ARP, ICMP and ICMPv6 (neighbour discovery, unreachables, packet-too-big), which the
 * kernel keeps and the stack must see too. Returns the bytes to keep: all, or none.
 */
SEC("socket")
int neighbours(struct __sk_buff *skb)
{
	__be16 ethertype;
	__u8 protocol;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &ethertype, sizeof(ethertype)))
		return 0;
	if (ethertype == bpf_htons(ETH_P_ARP))
		return skb->len;
	if (ethertype == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, protocol), &protocol, 1))
			return 0;
		return protocol == IPPROTO_ICMP ? skb->len : 0;
	}
	if (ethertype == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, nexthdr), &protocol, 1))
			return 0;
		return protocol == IPPROTO_ICMPV6 ? skb->len : 0;
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
