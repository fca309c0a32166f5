// Package firewall keeps loom's masquerade and forward rules in the kernel:
// the packet-filter half of what flanneld's -ip-masq and
// -iptables-forward-rules do, rendered to nftables or iptables from ONE rule
// table in code.
//
// # What it owns
//
// nftables (modes nftables and auto): the table "loom" in families ip and
// ip6, with two base chains,
//
//	nat-postrouting  type nat hook postrouting priority srcnat
//	filter-forward   type filter hook forward priority filter
//
// iptables (mode iptables; go-iptables, iptables and ip6tables): the chain
// LOOM-POSTRTG in table nat, jumped from POSTROUTING, and LOOM-FWD in table
// filter, jumped from FORWARD, every rule with a comment. In modes nftables
// and auto, LOOM-FWD is also installed when iptables' FORWARD policy is DROP
// (Docker sets it): a packet is forwarded only if every base chain on the
// forward hook accepts it, and an accept in table loom cannot override a drop
// in table ip filter, so the accept has to be made there too.
//
// One table per family, not one inet table: DESIGN says "table loom per
// family", iptables is per family anyway (so both renderings walk the same
// per-family rule list), kube-proxy and flannel do the same, and nat chains
// in inet tables need kernel 5.2 while ip/ip6 nat works on every kernel nft
// supports. The IPv4 and IPv6 paths are one code path over a family value.
//
// # The rule table (DESIGN §3, flannel's semantics without its
// over-masquerading)
//
// For Network N and this node's Subnet S, in order, hook postrouting:
//
//	1  mark & 0x4000 == 0x4000      return      left to kube-proxy, which masquerades it
//	2  src in N, dst in N           return      pod to pod keeps its source
//	3  src in N, dst not multicast  masquerade  pod to outside (fully-random)
//	4  src not in N, dst in S       return      host to a local pod keeps its source
//	5  src not in N, dst in N       masquerade  host to a remote pod, so the reply
//	                                            comes back through the overlay
//
// and hook forward, when ForwardRules is on: src in N accept; dst in N
// accept. IPMasq off removes 1-5. Rule 4 is what keeps node-to-local-pod
// traffic (kubelet probes) unNATed; iptables cannot say "in N but not in S"
// in one rule, hence the RETURN before the MASQUERADE, as in flannel.
//
// # How it reconciles
//
// The desired state is data (ruleTable), computed from the addresses given to
// Set. Every Resync (default 5 s), at start and after Set, the kernel is read
// and compared with it; nothing is written when they agree.
//
//   - nftables: a family's table is compared by its chains and by the ordered
//     comments of their rules (each comment is unique and names the prefixes
//     it is about, so a changed subnet changes the comments), one
//     `nft list table` per family. On any difference the whole table is
//     replaced in one nft transaction ("add table; delete table; add table;
//     add chain...; add rule..."), which the kernel applies atomically: no
//     packet sees a half-written table. (nft 1.0.6, the version here, has no
//     "destroy"; add-then-delete is its emulation.) Not detected: a rule body
//     edited in place with its comment kept, or a changed chain policy.
//   - iptables: a chain is compared rule by rule with `iptables -S` (quotes
//     aside, loom writes specs in the order iptables prints them), and the
//     jump into it is checked with `iptables -C`. go-iptables has no
//     transactions, so a chain that differs is replaced without a gap: its
//     rules are written to a staging chain (LOOM-POSTRTG-NEW), the jump in
//     POSTROUTING is switched to the staging chain with one "-R" (atomic),
//     the real chain is rewritten while nothing jumps to it, the jump is
//     switched back, and the staging chain is deleted. A chain nobody jumps
//     to yet is simply filled, then jumped to. The rule number "-R" uses is
//     read just before; another program inserting into POSTROUTING in that
//     instant is the accepted race. Jumps are inserted at position 1, ahead
//     of any DROP or REJECT another program appends to FORWARD.
//
// Objects loom no longer wants (a family whose network went away, LOOM-FWD
// after FORWARD's policy went back to ACCEPT, the other backend's leftovers
// after a mode switch) are swept at the first sync and after a change of
// addresses or of FORWARD's policy; steady-state syncs only read.
//
// When Run's context ends the rules stay: pods keep working while the agent
// restarts. Cleanup removes everything (for `loom agent --cleanup`).
//
// # Kernel quirks
//
//   - Every exec of nft or iptables must happen inside the target network
//     namespace; a child process inherits the namespace of the OS thread
//     that forks it, so all calls run inside ns.Do on a locked thread.
//   - No dependency on br_netfilter: no module is loaded and
//     /proc/sys/net/bridge is never read. When it is loaded, bridged pod
//     traffic crosses FORWARD and the forward accept covers it.
//   - `iptables -C` of a jump to a chain that does not exist fails (exit 2)
//     instead of answering "no such rule": the chain is looked up first.
//   - Listing (`iptables -S`, `nft list table`) creates nothing; in a
//     namespace loom never used, New and Cleanup leave the ruleset empty
//     (iptables-nft would create its nat and filter tables on any write).
//   - MASQUERADE --random-fully needs iptables 1.6.2; older binaries get
//     plain MASQUERADE and a log line. nft's "fully-random" is assumed and
//     proven by the first write of a masquerade rule; only when that write
//     fails does nft --check ask whether fully-random is the reason, and
//     then the table is written with plain masquerade (and a log line).
//     Every nft write or --check is a kernel transaction, and those of one
//     namespace take turns (10-20 ms each on a small VM): New makes two
//     (knftables' probes), a first sync on a fresh node one.
package firewall
