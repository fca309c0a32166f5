package doctor

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/cni/libcni"

	"github.com/loomnet/loom/internal/cni"
	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/subnetenv"
)

func gatherSubnetEnv(path string) SubnetEnvFacts {
	s := SubnetEnvFacts{Path: path}
	env, err := subnetenv.Read(path)
	if err != nil {
		s.Err = err
		return s
	}
	s.Env = &env
	if st, err := os.Stat(path); err == nil {
		s.ModTime = st.ModTime()
	}
	return s
}

// gatherCNI reads the conf dir the way libcni (and so containerd and
// CRI-O) does: *.conf, *.conflist and *.json, sorted by name, the first
// valid one wins; and the runtime's cached results.
func gatherCNI(confDir, cacheDir string) CNIFacts {
	c := CNIFacts{ConfDir: confDir, CacheDir: cacheDir}
	files, err := libcni.ConfFiles(confDir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		c.DirErr = err
	} else if _, err := os.Stat(confDir); err != nil {
		c.DirErr = err
	}
	slices.Sort(files)
	for _, path := range files {
		c.Files = append(c.Files, readCNIFile(path))
	}
	c.Cache, c.CacheErr = readCNICache(cacheDir)
	if chosen, ok := c.Chosen(); ok {
		var mine []CacheEntry
		for _, e := range c.Cache {
			if e.Network == chosen.Name {
				mine = append(mine, e)
			}
		}
		c.Cache = mine
	}
	return c
}

func readCNIFile(path string) CNIFile {
	f := CNIFile{Path: path}
	data, err := os.ReadFile(path)
	if err != nil {
		f.Err = err
		return f
	}
	var list *libcni.NetworkConfigList
	if strings.HasSuffix(path, ".conflist") {
		list, err = libcni.ConfListFromBytes(data)
	} else {
		// A single-plugin .conf file, which runtimes still accept.
		var conf *libcni.PluginConfig
		if conf, err = libcni.NetworkPluginConfFromBytes(data); err == nil {
			list = &libcni.NetworkConfigList{Name: conf.Network.Name, CNIVersion: conf.Network.CNIVersion, Plugins: []*libcni.PluginConfig{conf}}
		}
	}
	if err != nil {
		f.Err = err
		return f
	}
	if len(list.Plugins) == 0 {
		f.Err = fmt.Errorf("no plugins")
		return f
	}
	f.Name = list.Name
	for _, p := range list.Plugins {
		f.Plugins = append(f.Plugins, p.Network.Type)
	}
	first := list.Plugins[0]
	switch first.Network.Type {
	case cni.PluginType:
		conf, err := loomConf(list.Name, list.CNIVersion, first.Bytes)
		if err != nil {
			f.Err = err
			return f
		}
		f.Loom = conf
	case "flannel":
		// flannel's plugin reads the same subnet.env and delegates to the
		// bridge plugin and host-local, whose store is the default one.
		var fc struct{ SubnetFile string }
		_ = json.Unmarshal(first.Bytes, &fc)
		if fc.SubnetFile == "" {
			fc.SubnetFile = subnetenv.DefaultPath
		}
		f.Loom = &cni.Config{Name: list.Name, SubnetFile: fc.SubnetFile, DataDir: ipam.DefaultDataDir, Bridge: cni.DefaultBridge}
	}
	return f
}

// loomConf parses a loom-cni entry of a list with loom-cni's own rules
// (the runtime injects the list's name and version into each plugin).
func loomConf(name, version string, raw []byte) (*cni.Config, error) {
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, err
	}
	m["name"], m["cniVersion"] = name, version
	data, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	conf, err := cni.ParseConf(data)
	if err != nil {
		return nil, err
	}
	return conf, nil
}

// readCNICache reads libcni's cached results (<dir>/results/<net>-<id>-<if>).
func readCNICache(dir string) ([]CacheEntry, error) {
	dir = filepath.Join(dir, "results")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []CacheEntry
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(dir, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		var c struct {
			ContainerID string `json:"containerId"`
			IfName      string `json:"ifName"`
			NetworkName string `json:"networkName"`
			NetNS       string `json:"netns"`
		}
		if json.Unmarshal(data, &c) != nil || c.ContainerID == "" {
			continue
		}
		ce := CacheEntry{ContainerID: c.ContainerID, IfName: c.IfName, Network: c.NetworkName, NetNS: c.NetNS, File: path}
		if c.NetNS != "" {
			_, err := os.Stat(c.NetNS)
			ce.NetNSExists = err == nil
		}
		out = append(out, ce)
	}
	return out, nil
}

// gatherIPAM lists the allocation store the chosen CNI config names,
// through ipam.Store.List (shared lock, creates nothing).
func gatherIPAM(c CNIFacts) IPAMFacts {
	chosen, found := c.Chosen()
	if !found || chosen.Loom == nil {
		return IPAMFacts{}
	}
	st, err := ipam.New(ipam.Config{DataDir: chosen.Loom.DataDir, Network: chosen.Loom.Name})
	if err != nil {
		return IPAMFacts{Err: err}
	}
	allocs, err := st.List()
	return IPAMFacts{Dir: st.Dir(), Allocations: allocs, Err: err}
}
