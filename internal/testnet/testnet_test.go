package testnet

import (
	"os"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

func TestNewNSIsolated(t *testing.T) {
	var path string
	t.Run("create", func(t *testing.T) {
		n := NewNS(t, "self")
		path = n.Path()
		err := n.Do(func(ns.NetNS) error {
			links, err := netlink.LinkList()
			if err != nil {
				return err
			}
			if len(links) != 1 || links[0].Attrs().Name != "lo" {
				t.Errorf("fresh namespace has links %v, want only lo", links)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("namespace %s still exists after the test: %v", path, err)
	}
}
