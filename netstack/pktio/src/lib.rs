//! Packet I/O engines for the stackroute netstack (work in progress).
