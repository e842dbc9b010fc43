/*
 * DPDK's per-packet API is static inline functions and macros (rte_eth_rx_burst, rte_pktmbuf_*,
 * rte_errno, RTE_BIT64 offload flags) that bindgen cannot call or evaluate; rte_mbuf and
 * rte_eth_conf are bitfields and unions. These sr_* functions wrap exactly what the engine uses,
 * so Rust sees only plain functions, plain structs and opaque pointers.
 */
#ifndef STACKROUTE_DPDK_H
#define STACKROUTE_DPDK_H

#include <stdint.h>

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_version.h>

/* sr_rx_checksum: what the port learned of a received frame's checksums. */
#define SR_RX_L4_GOOD 1u
#define SR_RX_L4_BAD 2u
#define SR_RX_IP_BAD 4u

/* sr_port_info.offloads: the offloads the engine can use, when the port offers them. */
#define SR_OFFLOAD_RX_CHECKSUM 1u
#define SR_OFFLOAD_TX_IPV4_CHECKSUM 2u
#define SR_OFFLOAD_TX_TCP_CHECKSUM 4u
#define SR_OFFLOAD_TX_TCP_TSO 8u
#define SR_OFFLOAD_TX_MULTI_SEGS 16u

/* A port's facts, from rte_eth_dev_info_get and friends. */
struct sr_port_info {
    char name[64];
    char driver[64];
    uint8_t mac[6];
    uint16_t mtu;
    uint32_t max_rx_pktlen;
    uint16_t max_rx_queues;
    uint16_t max_tx_queues;
    uint32_t offloads;
};

const char *sr_version(void);
/*
 * rte_eal_init with EAL's output on stderr: EAL logs and prints its usage to stdout, which
 * carries the tools' reports. Returns rte_eal_init's value; rte_errno says why on failure.
 */
int sr_eal_init(int argc, char **argv);
int sr_errno(void);

uint16_t sr_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t sr_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);

int sr_pktmbuf_alloc_bulk(struct rte_mempool *pool, struct rte_mbuf **mbufs, unsigned int n);
void sr_pktmbuf_free(struct rte_mbuf *m);
/* The first segment's data and length; *segments is the chain's length. */
uint8_t *sr_pktmbuf_data(struct rte_mbuf *m, uint16_t *data_len, uint16_t *segments);
/* The next segment of a chain, or NULL. */
struct rte_mbuf *sr_pktmbuf_next(struct rte_mbuf *m);
/* Makes an empty single-segment mbuf `len` bytes long; NULL if its room is smaller. */
uint8_t *sr_pktmbuf_reset_to(struct rte_mbuf *m, uint16_t len);
/* Shortens a single-segment mbuf to `len` bytes (no larger than it is). */
void sr_pktmbuf_set_len(struct rte_mbuf *m, uint16_t len);
uint32_t sr_rx_checksum(const struct rte_mbuf *m);
/*
 * Asks the port to complete a TCP frame's checksums (IPv4 header and TCP; the TCP field holds
 * the pseudo-header sum): `l3_len` is the IP header's length after a 14-byte Ethernet header.
 */
void sr_tx_tcp_checksum(struct rte_mbuf *m, uint16_t l3_len, int ipv6);
/*
 * Asks the port to cut a TCP/IPv4 frame into segments of `segment_size` payload bytes (TSO),
 * completing their checksums; rewrites the TCP checksum field to the pseudo-header sum without
 * the length, as TSO wants it.
 */
void sr_tx_tcp_segmentation(struct rte_mbuf *m, uint16_t l3_len, uint16_t l4_len,
                            uint16_t segment_size);

int sr_port_info(uint16_t port, struct sr_port_info *info);
/*
 * One RX and one TX queue with `rx_desc`/`tx_desc` descriptors, RX buffers from `pool`;
 * `offloads` is a subset of sr_port_info.offloads. Returns 0 or a negative errno.
 */
int sr_port_configure(uint16_t port, uint16_t rx_desc, uint16_t tx_desc, struct rte_mempool *pool,
                      uint32_t offloads);

#endif
