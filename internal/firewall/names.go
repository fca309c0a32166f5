package firewall

// Every name loom gives a kernel object, and every name it relies on.
const (
	// Table is loom's nftables table, one per family: "ip loom", "ip6 loom".
	Table = "loom"
	// NFTNATChain is the nat base chain of Table (hook postrouting,
	// priority srcnat).
	NFTNATChain = "nat-postrouting"
	// NFTForwardChain is the filter base chain of Table (hook forward,
	// priority filter).
	NFTForwardChain = "filter-forward"

	// IPTNATChain is loom's chain in iptables' nat table, jumped from
	// POSTROUTING.
	IPTNATChain = "LOOM-POSTRTG"
	// IPTForwardChain is loom's chain in iptables' filter table, jumped
	// from FORWARD.
	IPTForwardChain = "LOOM-FWD"
	// iptNATStaging and iptForwardStaging hold the new rules while a chain
	// is replaced (see the package doc); they exist only during a sync.
	iptNATStaging     = "LOOM-POSTRTG-NEW"
	iptForwardStaging = "LOOM-FWD-NEW"

	// iptables tables and built-in chains loom hooks into.
	iptNAT         = "nat"
	iptFilter      = "filter"
	iptPostrouting = "POSTROUTING"
	iptForward     = "FORWARD"

	// Comments on the jumps into loom's chains.
	iptNATJumpComment     = "loom masquerade"
	iptForwardJumpComment = "loom forward"
	// tableComment is the comment on Table.
	tableComment = "loom: pod network masquerade and forward rules (managed by loom agent, edits are reverted)"

	// kubeProxyMark is kube-proxy's masquerade mark (--iptables-masquerade-bit
	// 14): packets carrying it are masqueraded by kube-proxy, not loom.
	kubeProxyMark = 0x4000
)
