#!/usr/bin/env bash
# Installs the Debian packages loom's lab and tests need, only when missing,
# so `make lab` and `make test` work on a machine that has only Go.
set -euo pipefail

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins) # loom bench: bridge + host-local baseline
command -v etcd >/dev/null 2>&1 || need+=(etcd-server etcd-client)

if ((${#need[@]} == 0)); then
	exit 0
fi
if [[ $(id -u) != 0 ]]; then
	echo "missing packages ${need[*]}: run as root (the lab and the tests need root anyway)" >&2
	exit 1
fi
echo "installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian's etcd-server enables a system etcd on 127.0.0.1:2379; loom's tests
# start their own members inside lab namespaces and need none on the host.
if [[ " ${need[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null 2>&1; then
	systemctl disable --now etcd >/dev/null 2>&1 || true
fi
