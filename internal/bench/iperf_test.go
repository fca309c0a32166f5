package bench

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// testdata/iperf3-*.json are real `iperf3 -c 127.0.0.1 -J -t 1 -i 0`
// outputs of iperf 3.12, made in a throwaway namespace: one stream, four
// streams (-P 4), and a client whose server was not there.

func TestParseIperf(t *testing.T) {
	for _, tc := range []struct {
		file    string
		want    float64
		wantErr string
	}{
		{file: "iperf3-1stream.json", want: 13435620761.825867},
		{file: "iperf3-4streams.json", want: 15100554264.266031}, // end.sum_received: every stream's total
		{file: "iperf3-refused.json", wantErr: "Connection refused"},
	} {
		t.Run(tc.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("testdata", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			got, err := parseIperf(data)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseIperf = %v, %v; want an error with %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("parseIperf = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestParseIperfMalformed(t *testing.T) {
	for _, tc := range []struct{ name, in, wantErr string }{
		{name: "not JSON", in: "iperf3: error - unable to connect", wantErr: "decode"},
		{name: "no end", in: `{"start":{}}`, wantErr: "no end.sum_received"},
		{name: "zero rate", in: `{"end":{"sum_received":{"bits_per_second":0}}}`, wantErr: "no end.sum_received"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := parseIperf([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("parseIperf(%q) error = %v, want one with %q", tc.in, err, tc.wantErr)
			}
		})
	}
	// An iperf3 without a receiver summary: what was sent is the figure.
	got, err := parseIperf([]byte(`{"end":{"sum_sent":{"bits_per_second":5e9}}}`))
	if err != nil || got != 5e9 {
		t.Fatalf("sum_sent only: %v, %v; want 5e9", got, err)
	}
}

func TestListensOn(t *testing.T) {
	table := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1E61 0100007F:D4E2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
`
	if !listensOn([]byte(table), 5201) {
		t.Error("port 5201 (0x1451) in state 0A is listening")
	}
	if listensOn([]byte(table), 7777) {
		t.Error("port 7777 (0x1E61) is an established connection, not a listener")
	}
	if listensOn([]byte(table), 80) {
		t.Error("port 80 is not in the table")
	}
}
