package vxlan

import (
	"encoding/json"
	"testing"
)

func TestParseOptions(t *testing.T) {
	defaults := Options{VNI: 1, Port: 8472}
	tests := []struct {
		name    string
		raw     string
		want    Options
		wantErr string
	}{
		{name: "absent", raw: "", want: defaults},
		{name: "null", raw: "null", want: defaults},
		{name: "empty object", raw: `{}`, want: defaults},
		{name: "type only, as netconf writes it", raw: `{"Type":"vxlan"}`, want: defaults},
		{
			name: "every key, flannel's spelling",
			raw:  `{"Type":"vxlan","VNI":4096,"Port":4789,"MTU":1400,"GBP":true,"Learning":true,"DirectRouting":true}`,
			want: Options{VNI: 4096, Port: 4789, MTU: 1400, GBP: true, Learning: true, DirectRouting: true},
		},
		{
			name: "keys are case-insensitive, as in flannel",
			raw:  `{"type":"VXLAN","vni":2,"PORT":4789,"mtu":9000,"gbp":false,"LEARNING":true,"directRouting":true}`,
			want: Options{VNI: 2, Port: 4789, MTU: 9000, Learning: true, DirectRouting: true},
		},
		{name: "VNI 0 is a valid VNI", raw: `{"VNI":0}`, want: Options{VNI: 0, Port: 8472}},
		{name: "largest VNI", raw: `{"VNI":16777215}`, want: Options{VNI: 16777215, Port: 8472}},
		{name: "Port 0 means the default, as in flannel", raw: `{"Port":0}`, want: defaults},
		{name: "null means absent", raw: `{"VNI":null,"DirectRouting":null}`, want: defaults},
		{name: "Windows-only keys are ignored", raw: `{"MacPrefix":"0E-2A","Name":"vxlan0"}`, want: defaults},
		{name: "smallest MTU", raw: `{"MTU":118}`, want: Options{VNI: 1, Port: 8472, MTU: 118}},

		{name: "not an object", raw: `[1]`,
			wantErr: "Backend is not a JSON object: json: cannot unmarshal array into Go value of type map[string]json.RawMessage"},
		{name: "unknown key", raw: `{"DirectRoute":true}`,
			wantErr: `unknown key "DirectRoute" in Backend: the vxlan backend's keys are Type, VNI, Port, MTU, GBP, Learning, DirectRouting, ChecksumOffload`},
		{name: "one key twice", raw: `{"VNI":1,"vni":2}`,
			wantErr: `keys "VNI" and "vni" in Backend both set VNI: keep one`},
		{name: "another type", raw: `{"Type":"host-gw"}`,
			wantErr: `Backend.Type is "host-gw", not "vxlan": this is the vxlan backend`},
		{name: "VNI too large", raw: `{"VNI":16777216}`,
			wantErr: "Backend.VNI 16777216 is out of range: use 0 to 16777215 (default 1), the same on every node"},
		{name: "VNI negative", raw: `{"VNI":-1}`,
			wantErr: "Backend.VNI -1 is out of range: use 0 to 16777215 (default 1), the same on every node"},
		{name: "VNI quoted", raw: `{"VNI":"1"}`,
			wantErr: `Backend.VNI "1" is not a whole number: write it without quotes, e.g. "VNI": 1`},
		{name: "VNI fractional", raw: `{"VNI":1.5}`,
			wantErr: `Backend.VNI 1.5 is not a whole number: write it without quotes, e.g. "VNI": 1`},
		{name: "Port too large", raw: `{"Port":65536}`,
			wantErr: "Backend.Port 65536 is out of range: use 1 to 65535, the same on every node, or leave it out for 8472"},
		{name: "Port negative", raw: `{"Port":-8472}`,
			wantErr: "Backend.Port -8472 is out of range: use 1 to 65535, the same on every node, or leave it out for 8472"},
		{name: "MTU too small", raw: `{"MTU":117}`,
			wantErr: "Backend.MTU 117 is too small: it is the underlay's MTU (as in flannel), pods get 50 bytes less, and need at least 68; " +
				"set the underlay interface's MTU (e.g. 1500) or leave MTU out to use it"},
		{name: "MTU too large", raw: `{"MTU":65536}`,
			wantErr: "Backend.MTU 65536 is above 65535: set the underlay interface's MTU (e.g. 1500) or leave MTU out to use it"},
		{name: "MTU quoted", raw: `{"MTU":"1400"}`,
			wantErr: `Backend.MTU "1400" is not a whole number: write it without quotes, e.g. "MTU": 1500`},
		{name: "boolean quoted", raw: `{"DirectRouting":"true"}`,
			wantErr: `Backend.DirectRouting "true" is not a boolean: write true or false, without quotes`},
		{name: "boolean as number", raw: `{"GBP":1}`,
			wantErr: `Backend.GBP 1 is not a boolean: write true or false, without quotes`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseOptions(json.RawMessage(tt.raw))
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("ParseOptions(%s) error\n %v\nwant\n %s", tt.raw, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseOptions(%s): %v", tt.raw, err)
			}
			if got != tt.want {
				t.Errorf("ParseOptions(%s) = %+v, want %+v", tt.raw, got, tt.want)
			}
		})
	}
}

func FuzzParseOptions(f *testing.F) {
	for _, s := range []string{``, `{}`, `{"VNI":1,"Port":8472}`, `{"mtu":1400,"gbp":true,"DirectRouting":true}`, `{"VNI":"x"}`, `[]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		o, err := ParseOptions(data)
		if err != nil {
			return
		}
		if o.VNI < 0 || o.VNI > MaxVNI || o.Port < 1 || o.Port > 65535 || (o.MTU != 0 && o.MTU < minPodMTU+overheadIPv4) {
			t.Errorf("ParseOptions(%q) accepted %+v", data, o)
		}
	})
}
