package deploy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/loomnet/loom/internal/cni"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/options"
)

func objects(t *testing.T) map[string]Object {
	t.Helper()
	objs, err := Objects()
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]Object{}
	for _, o := range objs {
		m[o.Kind+"/"+o.Name] = o
	}
	return m
}

func decode[T any](t *testing.T, objs map[string]Object, key string) T {
	t.Helper()
	o, ok := objs[key]
	if !ok {
		t.Fatalf("manifest has no %s", key)
	}
	var v T
	if err := json.Unmarshal(o.JSON, &v); err != nil {
		t.Fatalf("decode %s: %v", key, err)
	}
	return v
}

func TestManifestHasEveryPart(t *testing.T) {
	objs := objects(t)
	for _, key := range []string{"Namespace/loom", "ServiceAccount/loom", "ClusterRole/loom", "ClusterRoleBinding/loom", "ConfigMap/loom-config", "DaemonSet/loom"} {
		if _, ok := objs[key]; !ok {
			t.Errorf("manifest has no %s", key)
		}
	}
}

// The ConfigMap's files are what the agent and the runtime read: they must
// pass loom's own parsers, not only be valid YAML.
func TestManifestConfigParses(t *testing.T) {
	cm := decode[corev1.ConfigMap](t, objects(t), "ConfigMap/loom-config")
	cfg, err := netconf.Parse([]byte(cm.Data["net-conf.json"]))
	if err != nil {
		t.Fatalf("net-conf.json: %v", err)
	}
	if cfg.Network.String() != "10.244.0.0/16" || cfg.Backend.Type != netconf.BackendVXLAN {
		t.Errorf("net-conf.json: Network %s backend %s, want kubeadm's usual 10.244.0.0/16 and vxlan", cfg.Network, cfg.Backend.Type)
	}
	list, err := libcni.ConfListFromBytes([]byte(cm.Data["cni-conf.json"]))
	if err != nil {
		t.Fatalf("cni-conf.json: %v", err)
	}
	if list.Plugins[0].Network.Type != cni.PluginType {
		t.Fatalf("first plugin is %q, want %s", list.Plugins[0].Network.Type, cni.PluginType)
	}
	// The runtime adds name and cniVersion to each plugin's config.
	var plugin map[string]any
	if err := json.Unmarshal(list.Plugins[0].Bytes, &plugin); err != nil {
		t.Fatal(err)
	}
	plugin["name"], plugin["cniVersion"] = list.Name, list.CNIVersion
	stdin, _ := json.Marshal(plugin)
	c, err := cni.ParseConf(stdin)
	if err != nil {
		t.Fatalf("loom-cni config: %v", err)
	}
	if c.SubnetFile != "/run/flannel/subnet.env" {
		t.Errorf("loom-cni reads %s, the agent writes /run/flannel/subnet.env", c.SubnetFile)
	}
}

// The DaemonSet's command line must be one the agent accepts, in kube mode,
// with the files where the volumes put them.
func TestManifestAgentArgsParse(t *testing.T) {
	objs := objects(t)
	ds := decode[appsv1.DaemonSet](t, objs, "DaemonSet/loom")
	var agent *corev1.Container
	for i, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == "loom" {
			agent = &ds.Spec.Template.Spec.Containers[i]
		}
	}
	if agent == nil {
		t.Fatal("DaemonSet has no loom container")
	}
	if !slices.Equal(agent.Command[1:], []string{"agent"}) {
		t.Fatalf("command %v, want loom agent", agent.Command)
	}
	env := map[string]string{"NODE_NAME": "node-1"}
	opts, err := options.Parse(agent.Args, func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("agent args %v: %v", agent.Args, err)
	}
	if !opts.KubeSubnetMgr || !opts.IPMasq || opts.NodeName != "node-1" {
		t.Errorf("parsed %+v: want kube mode, ip-masq, node name from NODE_NAME", opts)
	}
	mounted := func(path string) bool {
		for _, m := range agent.VolumeMounts {
			if strings.HasPrefix(path, m.MountPath+"/") {
				return true
			}
		}
		return false
	}
	for _, p := range []string{opts.NetConfigPath, opts.SubnetFile, opts.StateDir + "/x"} {
		if !mounted(p) {
			t.Errorf("%s is on no volume of the agent container: it would be lost or unreadable", p)
		}
	}
	if ds.Spec.Template.Spec.ServiceAccountName != "loom" || !ds.Spec.Template.Spec.HostNetwork {
		t.Errorf("DaemonSet: service account %q hostNetwork %v", ds.Spec.Template.Spec.ServiceAccountName, ds.Spec.Template.Spec.HostNetwork)
	}
	crb := decode[rbacv1.ClusterRoleBinding](t, objs, "ClusterRoleBinding/loom")
	if len(crb.Subjects) != 1 || crb.Subjects[0].Name != "loom" || crb.Subjects[0].Namespace != "loom" || crb.RoleRef.Name != "loom" {
		t.Errorf("ClusterRoleBinding binds %+v to %+v, want ServiceAccount loom/loom to ClusterRole loom", crb.Subjects, crb.RoleRef)
	}
}

// The RBAC rules grant only reads of Nodes and writes of their status; no
// secrets, no pods, no deletes.
func TestManifestRBACIsLeast(t *testing.T) {
	cr := decode[rbacv1.ClusterRole](t, objects(t), "ClusterRole/loom")
	allowed := map[string][]string{"nodes": {"get", "list", "watch"}, "nodes/status": {"patch"}}
	for _, r := range cr.Rules {
		for _, res := range r.Resources {
			want, ok := allowed[res]
			if !ok {
				t.Errorf("rule grants %v on %s, which the agent does not use", r.Verbs, res)
				continue
			}
			for _, v := range r.Verbs {
				if !slices.Contains(want, v) {
					t.Errorf("rule grants %s on %s, which the agent does not use", v, res)
				}
			}
		}
	}
}

// The systemd example environment must parse as the agent's flags.
func TestSystemdEnvParses(t *testing.T) {
	env := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(AgentEnv))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("line %q is not KEY=VALUE", line)
		}
		env[k] = v
	}
	opts, err := options.Parse([]string{"--node-name", "host-1"}, func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("loom-agent.env: %v", err)
	}
	if len(opts.EtcdEndpoints) != 3 || opts.EtcdCAFile == "" || !opts.IPMasq || len(opts.Iface) != 1 {
		t.Errorf("loom-agent.env parsed to %+v: want 3 TLS etcd endpoints, ip-masq and one -iface", opts)
	}
}
