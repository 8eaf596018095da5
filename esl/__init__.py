"""FreeSWITCH Event Socket adapter (outbound-socket server, inbound client): comes with the FreeSWITCH issue."""
