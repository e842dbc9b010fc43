#include "stackroute_dpdk.h"

#include <rte_ip.h>
#include <rte_log.h>
#include <rte_tcp.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

const char *sr_version(void) { return rte_version(); }

int sr_errno(void) { return rte_errno; }

int sr_eal_init(int argc, char **argv) {
    int saved_stdout, rc, init_errno;

    rte_openlog_stream(stderr);
    fflush(stdout);
    saved_stdout = dup(STDOUT_FILENO);
    if (saved_stdout >= 0)
        dup2(STDERR_FILENO, STDOUT_FILENO);
    rc = rte_eal_init(argc, argv);
    init_errno = rte_errno;
    fflush(stdout);
    if (saved_stdout >= 0) {
        dup2(saved_stdout, STDOUT_FILENO);
        close(saved_stdout);
    }
    rte_errno = init_errno;
    return rc;
}

uint16_t sr_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n) {
    return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t sr_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n) {
    return rte_eth_tx_burst(port, queue, pkts, n);
}

int sr_pktmbuf_alloc_bulk(struct rte_mempool *pool, struct rte_mbuf **mbufs, unsigned int n) {
    return rte_pktmbuf_alloc_bulk(pool, mbufs, n);
}

void sr_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

uint8_t *sr_pktmbuf_data(struct rte_mbuf *m, uint16_t *data_len, uint16_t *segments) {
    *data_len = rte_pktmbuf_data_len(m);
    *segments = m->nb_segs;
    return rte_pktmbuf_mtod(m, uint8_t *);
}

struct rte_mbuf *sr_pktmbuf_next(struct rte_mbuf *m) { return m->next; }

uint8_t *sr_pktmbuf_reset_to(struct rte_mbuf *m, uint16_t len) {
    rte_pktmbuf_reset(m);
    return (uint8_t *)rte_pktmbuf_append(m, len);
}

void sr_pktmbuf_set_len(struct rte_mbuf *m, uint16_t len) {
    if (len <= m->data_len) {
        m->data_len = len;
        m->pkt_len = len;
    }
}

uint32_t sr_rx_checksum(const struct rte_mbuf *m) {
    uint32_t facts = 0;
    if ((m->ol_flags & RTE_MBUF_F_RX_L4_CKSUM_MASK) == RTE_MBUF_F_RX_L4_CKSUM_GOOD)
        facts |= SR_RX_L4_GOOD;
    if ((m->ol_flags & RTE_MBUF_F_RX_L4_CKSUM_MASK) == RTE_MBUF_F_RX_L4_CKSUM_BAD)
        facts |= SR_RX_L4_BAD;
    if ((m->ol_flags & RTE_MBUF_F_RX_IP_CKSUM_MASK) == RTE_MBUF_F_RX_IP_CKSUM_BAD)
        facts |= SR_RX_IP_BAD;
    return facts;
}

void sr_tx_tcp_checksum(struct rte_mbuf *m, uint16_t l3_len, int ipv6) {
    m->l2_len = RTE_ETHER_HDR_LEN;
    m->l3_len = l3_len;
    if (ipv6)
        m->ol_flags |= RTE_MBUF_F_TX_IPV6 | RTE_MBUF_F_TX_TCP_CKSUM;
    else
        m->ol_flags |= RTE_MBUF_F_TX_IPV4 | RTE_MBUF_F_TX_IP_CKSUM | RTE_MBUF_F_TX_TCP_CKSUM;
}

void sr_tx_tcp_segmentation(struct rte_mbuf *m, uint16_t l3_len, uint16_t l4_len,
                            uint16_t segment_size) {
    struct rte_ipv4_hdr *ip =
        rte_pktmbuf_mtod_offset(m, struct rte_ipv4_hdr *, RTE_ETHER_HDR_LEN);
    struct rte_tcp_hdr *tcp =
        rte_pktmbuf_mtod_offset(m, struct rte_tcp_hdr *, RTE_ETHER_HDR_LEN + l3_len);

    m->l2_len = RTE_ETHER_HDR_LEN;
    m->l3_len = l3_len;
    m->l4_len = l4_len;
    m->tso_segsz = segment_size;
    m->ol_flags |= RTE_MBUF_F_TX_IPV4 | RTE_MBUF_F_TX_IP_CKSUM | RTE_MBUF_F_TX_TCP_SEG;
    ip->hdr_checksum = 0;
    tcp->cksum = rte_ipv4_phdr_cksum(ip, m->ol_flags);
}

int sr_port_info(uint16_t port, struct sr_port_info *info) {
    struct rte_eth_dev_info dev;
    struct rte_ether_addr mac;
    int rc;

    memset(info, 0, sizeof(*info));
    rc = rte_eth_dev_info_get(port, &dev);
    if (rc != 0)
        return rc;
    rc = rte_eth_dev_get_name_by_port(port, info->name);
    if (rc != 0)
        return rc;
    if (dev.driver_name != NULL)
        strncpy(info->driver, dev.driver_name, sizeof(info->driver) - 1);
    rc = rte_eth_macaddr_get(port, &mac);
    if (rc != 0)
        return rc;
    memcpy(info->mac, mac.addr_bytes, sizeof(info->mac));
    if (rte_eth_dev_get_mtu(port, &info->mtu) != 0)
        info->mtu = RTE_ETHER_MTU;
    info->max_rx_pktlen = dev.max_rx_pktlen;
    info->max_rx_queues = dev.max_rx_queues;
    info->max_tx_queues = dev.max_tx_queues;
    if ((dev.rx_offload_capa & (RTE_ETH_RX_OFFLOAD_TCP_CKSUM | RTE_ETH_RX_OFFLOAD_IPV4_CKSUM)) ==
        (RTE_ETH_RX_OFFLOAD_TCP_CKSUM | RTE_ETH_RX_OFFLOAD_IPV4_CKSUM))
        info->offloads |= SR_OFFLOAD_RX_CHECKSUM;
    if (dev.tx_offload_capa & RTE_ETH_TX_OFFLOAD_IPV4_CKSUM)
        info->offloads |= SR_OFFLOAD_TX_IPV4_CHECKSUM;
    if (dev.tx_offload_capa & RTE_ETH_TX_OFFLOAD_TCP_CKSUM)
        info->offloads |= SR_OFFLOAD_TX_TCP_CHECKSUM;
    if (dev.tx_offload_capa & RTE_ETH_TX_OFFLOAD_TCP_TSO)
        info->offloads |= SR_OFFLOAD_TX_TCP_TSO;
    if (dev.tx_offload_capa & RTE_ETH_TX_OFFLOAD_MULTI_SEGS)
        info->offloads |= SR_OFFLOAD_TX_MULTI_SEGS;
    return 0;
}

int sr_port_configure(uint16_t port, uint16_t rx_desc, uint16_t tx_desc, struct rte_mempool *pool,
                      uint32_t offloads) {
    struct rte_eth_conf conf;
    struct rte_eth_dev_info dev;
    struct rte_eth_rxconf rxconf;
    struct rte_eth_txconf txconf;
    int socket = rte_eth_dev_socket_id(port);
    int rc;

    rc = rte_eth_dev_info_get(port, &dev);
    if (rc != 0)
        return rc;
    memset(&conf, 0, sizeof(conf));
    if (offloads & SR_OFFLOAD_RX_CHECKSUM)
        conf.rxmode.offloads |= RTE_ETH_RX_OFFLOAD_TCP_CKSUM | RTE_ETH_RX_OFFLOAD_IPV4_CKSUM;
    if (offloads & SR_OFFLOAD_TX_IPV4_CHECKSUM)
        conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
    if (offloads & SR_OFFLOAD_TX_TCP_CHECKSUM)
        conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
    if (offloads & SR_OFFLOAD_TX_TCP_TSO)
        conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_TCP_TSO;
    if (offloads & SR_OFFLOAD_TX_MULTI_SEGS)
        conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
    rc = rte_eth_dev_configure(port, 1, 1, &conf);
    if (rc != 0)
        return rc;
    rc = rte_eth_dev_adjust_nb_rx_tx_desc(port, &rx_desc, &tx_desc);
    if (rc != 0)
        return rc;
    rxconf = dev.default_rxconf;
    rxconf.offloads = conf.rxmode.offloads;
    rc = rte_eth_rx_queue_setup(port, 0, rx_desc, socket < 0 ? 0 : (unsigned)socket, &rxconf, pool);
    if (rc != 0)
        return rc;
    txconf = dev.default_txconf;
    txconf.offloads = conf.txmode.offloads;
    return rte_eth_tx_queue_setup(port, 0, tx_desc, socket < 0 ? 0 : (unsigned)socket, &txconf);
}
